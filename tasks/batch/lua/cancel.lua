-- KEYS meta; ARGV now ttl. Returns 1 if this call cancelled the batch.
local m = redis.call('HMGET', KEYS[1], 'state', 'handler')
if not m[2] then return -1 end
if m[1] then return 0 end
redis.call('HSET', KEYS[1], 'cancelled', '1', 'state', 'cancelled', 'finished_at', ARGV[1])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]))
return 1
