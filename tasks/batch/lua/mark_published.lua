-- KEYS meta; ARGV attempt total chunks ttl. Returns ready (0/1).
-- Runs after ready.lua (ready(), touch()).
if redis.call('HGET', KEYS[1], 'attempt') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'published', ARGV[1], 'total', ARGV[2], 'chunks', ARGV[3])
touch(tonumber(ARGV[4]), KEYS[1])
return ready(KEYS[1])
