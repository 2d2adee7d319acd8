-- The sequence of the first retained message published at or after ARGV[1] (ms), or the
-- next sequence if none. Returns nil if the topic does not exist.
local m = redis.call('HMGET', meta, 'first', 'next')
if not m[1] then
  return false
end
local time = tonumber(ARGV[1])
return first_true(tonumber(m[1]), tonumber(m[2]), function(s)
  return (probe(log, s)) >= time
end)
