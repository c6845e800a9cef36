-- KEYS meta; ARGV field token outcome ttl. If this run still holds the claim: outcome 'sent'
-- marks the callback sent, '' releases the claim (the send raised). Returns 1 if it held it.
local held = redis.call('HGET', KEYS[1], ARGV[1])
local mine = 'claimed:' .. ARGV[2] .. ':'
if not held or string.sub(held, 1, #mine) ~= mine then return 0 end
if ARGV[3] == '' then
  redis.call('HDEL', KEYS[1], ARGV[1])
else
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[4]))
return 1
