-- The newest finished jobs, newest first. ARGV: name, limit. Returns {seq, fields} per job.
if not load_meta() then
  return no_queue()
end
local out = {}
local seqs = redis.call('LRANGE', K_HISTORY, -tonumber(ARGV[2]), -1)
for i = #seqs, 1, -1 do
  out[#out + 1] = { tonumber(seqs[i]), redis.call('HGETALL', B .. ':job:' .. seqs[i]) }
end
return out
