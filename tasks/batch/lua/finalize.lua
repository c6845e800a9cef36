-- KEYS meta result; ARGV attempt state result now ttl. Returns 1 if this call finalized.
-- Runs after ready.lua (ready(), touch()).
if ready(KEYS[1]) == 0 or redis.call('HGET', KEYS[1], 'attempt') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'finalized', ARGV[1], 'state', ARGV[2], 'finished_at', ARGV[4])
redis.call('SET', KEYS[2], ARGV[3], 'EX', tonumber(ARGV[5]))
touch(tonumber(ARGV[5]), KEYS[1])
return 1
