-- Prepended to record_chunk, mark_published and finalize (store._script). Ready to finalize:
-- the attempt is fully published, every item of it has an outcome, it is not finalized yet
-- and nobody cancelled the batch.
local function ready(meta)
  local m = redis.call('HMGET', meta, 'attempt', 'published', 'processed', 'total',
                       'finalized', 'cancelled')
  if m[6] then return 0 end
  if m[2] ~= m[1] or m[5] == m[1] then return 0 end
  if tonumber(m[3] or '0') < tonumber(m[4] or '0') then return 0 end
  return 1
end
local function touch(ttl, ...)
  for _, key in ipairs({...}) do redis.call('EXPIRE', key, ttl) end
end
