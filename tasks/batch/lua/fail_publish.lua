-- KEYS meta; ARGV attempt reason now ttl total ('' for a retry attempt: the total is known).
-- Ends an attempt whose publishing raised: returns 1 if it set publish_failed, 0 if the batch
-- had already finished (cancelled) or moved on to another attempt, -1 if it is unknown.
local m = redis.call('HMGET', KEYS[1], 'attempt', 'state', 'handler')
if not m[3] then return -1 end
if m[1] ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'error', ARGV[2])
if ARGV[5] ~= '' then redis.call('HSET', KEYS[1], 'total', ARGV[5]) end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[4]))
if m[2] then return 0 end
redis.call('HSET', KEYS[1], 'state', 'publish_failed', 'cancelled', '1', 'finished_at', ARGV[3])
return 1
