-- {first, next, retained payload bytes}, or nil if the topic does not exist.
local m = redis.call('HMGET', meta, 'first', 'next', 'cum')
if not m[1] then
  return false
end
local first, next, cum = tonumber(m[1]), tonumber(m[2]), tonumber(m[3])
local bytes = 0
if first < next then
  local _, c, len = probe(log, first)
  bytes = cum - (c - len)
end
return { m[1], m[2], num(bytes) }
