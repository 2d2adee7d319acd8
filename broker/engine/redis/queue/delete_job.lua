-- Deletes a job's record whatever its state, as the in-process `Queue::delete`: a live
-- job leaves its index and ordering key (the key's next job becomes visible), a lease on
-- it becomes stale, a finished one leaves history; nothing is counted. ARGV: name, job
-- id, a random number (for the expiries run first). Returns {seq, the job's fields
-- before the delete}.
if not load_meta() then
  return no_queue()
end
local now = now_ms()
tick(now, tonumber(ARGV[3]))
local id = ARGV[2]
local seq = redis.call('HGET', K_IDS, id)
if not seq then
  return fail('SLUICE_NOTFOUND', 'job_id ' .. id .. ' not found in queue ' .. quoted(NAME))
end
local before = redis.call('HGETALL', job_key(tonumber(seq)))
forget_record(seq, now)
redis.call('HDEL', K_IDS, id)
wake()
return { tonumber(seq), before }
