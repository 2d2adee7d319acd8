-- The newest finished jobs, newest first. ARGV: name, limit. Returns {seq, fields} per job.
if not load_meta() then
  return no_queue()
end
local out = {}
local entries = redis.call('LRANGE', K_HISTORY, -tonumber(ARGV[2]), -1)
for i = #entries, 1, -1 do
  local seq = history_seq(entries[i])
  out[#out + 1] = { tonumber(seq), redis.call('HGETALL', B .. ':job:' .. seq) }
end
return out
