-- A job by id. ARGV: name, id. Returns {seq, its fields}, or nil.
local seq = redis.call('HGET', K_IDS, ARGV[2])
if not seq then
  return nil
end
return { tonumber(seq), redis.call('HGETALL', B .. ':job:' .. seq) }
