-- {first, next, retained payload bytes, open subscriptions on every node, gap notices
-- sent}, or nil if the topic does not exist. ARGV: stale ms (a node's count not written
-- for that long is not counted: see subs_put.lua).
local m = redis.call('HMGET', meta, 'first', 'next', 'cum', 'gaps')
if not m[1] then
  return false
end
local first, next, cum = tonumber(m[1]), tonumber(m[2]), tonumber(m[3])
local bytes = 0
if first < next then
  local _, c, len = probe(log, first)
  bytes = cum - (c - len)
end
local stale = tonumber(ARGV[1])
local now = now_ms()
local subscribers = 0
local all = redis.call('HGETALL', base .. ':subs')
for i = 2, #all, 2 do
  local count, at = string.match(all[i], '^(%d+) (%d+) ')
  if at and tonumber(at) + stale > now then
    subscribers = subscribers + tonumber(count)
  end
end
return { m[1], m[2], num(bytes), num(subscribers), m[4] or '0' }
