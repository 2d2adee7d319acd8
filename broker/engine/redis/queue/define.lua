-- Creates a queue or changes its policy. ARGV: name, mode ('create': refuse an existing
-- queue; 'ensure': leave an existing one alone; 'set': refuse a missing one), the encoded
-- policy, then the meta fields the scripts read, as field/value pairs (with 'ensure',
-- also `by_consumer` 1 for a queue a Lease or Consume makes). Returns 1 if it created the
-- queue.
local mode = ARGV[2]
local exists = load_meta()
if exists and mode == 'create' then
  return fail('SLUICE_EXISTS', 'queue ' .. quoted(NAME) .. ' already exists (use UpdateQueue)')
end
if exists and mode == 'ensure' then
  return 0
end
if not exists and mode == 'set' then
  return no_queue()
end
local old_rate = exists and ((M.rate_ps or '') .. '/' .. (M.rate_burst or '')) or nil
local args = { 'HSET', K_META, 'policy', ARGV[3] }
for i = 4, #ARGV do
  args[#args + 1] = ARGV[i]
end
redis.call(unpack(args))
if mode == 'set' then
  named_by_producer()
end
if not exists then
  redis.call('HSET', K_META, 'seq', 0, 'paused', 0)
end
keep_as_hash_table(K_META)
keep_as_hash_table(K_RATES)
load_meta()
-- A changed rate limit starts with a full bucket; the same one keeps its state.
if old_rate ~= (M.rate_ps .. '/' .. M.rate_burst) then
  redis.call('HDEL', K_META, 'tok', 'tok_at')
end
trim_history()
if exists then
  return 0
end
return 1
