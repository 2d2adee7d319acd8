-- Claims jobs parked by a redrive whose owner's time ran out (it stopped, or is too
-- slow), so the caller finishes their move. ARGV: name, most, how long (ms) the caller
-- then owns them. Returns {{seq, fields}...} (fields empty if the hash is gone).
local K_RDBOX = B .. ':rdbox'
local now = now_ms()
local out = {}
local due = redis.call('ZRANGEBYSCORE', K_RDBOX, '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
for _, s in ipairs(due) do
  redis.call('ZADD', K_RDBOX, after(now, tonumber(ARGV[3])), s)
  out[#out + 1] = { tonumber(s), redis.call('HGETALL', B .. ':rd:' .. s) }
end
return out
