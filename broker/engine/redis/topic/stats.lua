-- {first, next, retained payload bytes, open subscriptions on every node, gap notices
-- sent, messages published in the rate window ending now}, or nil if the topic does not exist. ARGV: stale ms (a node's count not written
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
-- The publishes of the seconds in the window ending now (`RateMeter::per_second`).
local second = math.floor(now / 1000)
local r = redis.call('HGETALL', rates)
local fields = {}
for i = 1, #r, 2 do
  fields[r[i]] = r[i + 1]
end
local published = 0
for slot = 0, RATE_WINDOW - 1 do
  local s = tonumber(fields['ps' .. slot] or '-1')
  if s >= 0 and s + RATE_WINDOW > second and s <= second then
    published = published + tonumber(fields['p' .. slot] or '0')
  end
end
return { m[1], m[2], num(bytes), num(subscribers), m[4] or '0', num(published) }
