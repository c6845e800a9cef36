-- KEYS meta; ARGV field token lease_ms ttl. Claims the sending of an attempt's callback, the
-- field holding ``claimed:<token>:<lease end, ms>`` and then ``sent``. Returns {1, 0} when
-- claimed (also a claim whose lease ended: its holder died before sending), {0, ms left} while
-- another run's lease lasts, {2, 0} once sent. Redis's clock, not the workers', times leases.
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local held = redis.call('HGET', KEYS[1], ARGV[1])
if held then
  local lease_end = string.match(held, '^claimed:[^:]*:(%d+)$')
  if not lease_end then return {2, 0} end
  if tonumber(lease_end) > now_ms then return {0, tonumber(lease_end) - now_ms} end
end
local lease_end = string.format('%.0f', now_ms + tonumber(ARGV[3]))
redis.call('HSET', KEYS[1], ARGV[1], 'claimed:' .. ARGV[2] .. ':' .. lease_end)
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[4]))
return {1, 0}
