-- A page of jobs in one state ('' for every live one), oldest first, after a seq. ARGV:
-- name, state, after, limit. Returns {more (0/1), then {seq, fields} per job}.
if not load_meta() then
  return no_queue()
end
local state, after, limit = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local found = {}
if state == 'completed' or state == 'dead' or state == 'cancelled' then
  -- History is bounded by the policy, so sorting the matches is cheap.
  local seqs = {}
  for _, entry in ipairs(redis.call('LRANGE', K_HISTORY, 0, -1)) do
    local seq = tonumber(history_seq(entry))
    if seq > after and jget(seq, 'state') == state then
      seqs[#seqs + 1] = seq
    end
  end
  table.sort(seqs)
  for i = 1, math.min(#seqs, limit + 1) do
    found[#found + 1] = seqs[i]
  end
else
  local from = '(' .. I(after)
  while #found <= limit do
    local chunk = redis.call('ZRANGEBYSCORE', K_LIVE, from, '+inf', 'LIMIT', 0, 512)
    if #chunk == 0 then
      break
    end
    for _, s in ipairs(chunk) do
      if #found > limit then
        break
      end
      if state == '' or jget(s, 'state') == state then
        found[#found + 1] = tonumber(s)
      end
    end
    from = '(' .. chunk[#chunk]
  end
end
local out = { 0 }
if #found > limit then
  out[1] = 1
end
for i = 1, math.min(#found, limit) do
  out[#out + 1] = { found[i], redis.call('HGETALL', job_key(found[i])) }
end
return out
