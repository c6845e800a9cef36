-- KEYS meta failures; ARGV ttl, then the indices of the failed items that stay failed (input
-- errors: not re-run). Starts the next attempt with the other failed items: returns
-- {attempt, retrying key} or {0, reason}.
local m = redis.call('HMGET', KEYS[1], 'state', 'attempt', 'failed', 'handler')
if not m[4] then return {0, 'unknown batch'} end
if m[1] ~= 'completed_with_failures' then
  return {0, 'only a batch in state completed_with_failures can be retried (state: '
             .. tostring(m[1] or 'running') .. ')'}
end
local attempt = tonumber(m[2]) + 1
local retrying = KEYS[1] .. ':retrying:' .. attempt
local ttl = tonumber(ARGV[1])
redis.call('RENAME', KEYS[2], retrying)
local kept = 0
for i = 2, #ARGV do
  local failure = redis.call('HGET', retrying, ARGV[i])
  if failure then
    redis.call('HSET', KEYS[2], ARGV[i], failure)
    redis.call('HDEL', retrying, ARGV[i])
    kept = kept + 1
  end
end
redis.call('HINCRBY', KEYS[1], 'processed', kept - tonumber(m[3]))
redis.call('HSET', KEYS[1], 'failed', kept, 'attempt', attempt)
redis.call('HDEL', KEYS[1], 'state', 'finished_at')
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('EXPIRE', retrying, ttl)
if kept > 0 then redis.call('EXPIRE', KEYS[2], ttl) end
return {attempt, retrying}
