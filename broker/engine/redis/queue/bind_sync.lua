-- Brings a queue's topic bindings up to date (see queue/binding.rs). ARGV: name, the
-- number of start cursors, then per topic: topic, cursor (`<epoch>/<seq>`, set only if
-- the topic has none), the number of patterns now started, those patterns, then the
-- fields of `:bind` to drop (`p:<pattern>` of removed bindings, `c:<topic>` of topics
-- no binding matches any more). Returns 1.
if not load_meta() then
  return no_queue()
end
local K_BIND = B .. ':bind'
local n = tonumber(ARGV[2])
local i = 3
for _ = 1, n do
  redis.call('HSETNX', K_BIND, 'c:' .. ARGV[i], ARGV[i + 1])
  i = i + 2
end
local marks = tonumber(ARGV[i])
i = i + 1
for _ = 1, marks do
  redis.call('HSET', K_BIND, 'p:' .. ARGV[i], '1')
  i = i + 1
end
while i <= #ARGV do
  redis.call('HDEL', K_BIND, ARGV[i])
  i = i + 1
end
return 1
