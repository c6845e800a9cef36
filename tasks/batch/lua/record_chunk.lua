-- KEYS meta done partials failures; ARGV field succeeded failed skipped partial ttl
-- then index/json pairs of failures. Returns {counted (0/1), ready (0/1)}.
-- Runs after ready.lua (ready(), touch()).
if redis.call('HSETNX', KEYS[2], ARGV[1], '1') == 0 then
  return {0, ready(KEYS[1])}
end
local succeeded, failed, skipped = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
redis.call('HINCRBY', KEYS[1], 'succeeded', succeeded)
redis.call('HINCRBY', KEYS[1], 'failed', failed)
redis.call('HINCRBY', KEYS[1], 'skipped', skipped)
redis.call('HINCRBY', KEYS[1], 'processed', succeeded + failed)
if ARGV[5] ~= '' then redis.call('HSET', KEYS[3], ARGV[1], ARGV[5]) end
for i = 7, #ARGV, 2 do redis.call('HSET', KEYS[4], ARGV[i], ARGV[i + 1]) end
touch(tonumber(ARGV[6]), KEYS[1], KEYS[2], KEYS[3], KEYS[4])
return {1, ready(KEYS[1])}
