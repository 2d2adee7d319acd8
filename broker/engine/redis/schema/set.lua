-- Sets a target's schema. KEYS[1]: the target's schema hash (`<base>:schema`: `cur` the
-- current revision, 0 for none; `last` the newest number given; `r:<n>` revision n's
-- encoded schema; `t:<n>` when it was set, unix ms). ARGV: the encoded schema, the
-- number of revisions kept. Returns {current revision, 1 if new else 0}.
local key = KEYS[1]
local cur = tonumber(redis.call('HGET', key, 'cur') or '0')
if cur > 0 and redis.call('HGET', key, 'r:' .. cur) == ARGV[1] then
  return { cur, 0 }
end
local rev = redis.call('HINCRBY', key, 'last', 1)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', key, 'r:' .. rev, ARGV[1], 't:' .. rev, string.format('%d', now), 'cur', rev)
local old = rev - tonumber(ARGV[2])
if old > 0 then
  redis.call('HDEL', key, 'r:' .. old, 't:' .. old)
end
return { rev, 1 }
