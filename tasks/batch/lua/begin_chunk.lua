-- KEYS meta; ARGV now. Returns {cancelled, handler, options}; notes the batch's start.
local m = redis.call('HMGET', KEYS[1], 'cancelled', 'handler', 'options')
if not m[1] and m[2] then redis.call('HSETNX', KEYS[1], 'started_at', ARGV[1]) end
return {m[1] and 1 or 0, m[2] or '', m[3] or '{}'}
