-- The dead letters waiting to move out of this queue, oldest first. ARGV: name, most.
-- Returns {seq, the dead job's fields (empty if its copy is gone)} per letter.
local out = {}
for _, s in ipairs(redis.call('LRANGE', K_OUTBOX, 0, tonumber(ARGV[2]) - 1)) do
  out[#out + 1] = { tonumber(s), redis.call('HGETALL', B .. ':dl:' .. s) }
end
return out
