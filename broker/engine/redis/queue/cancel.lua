-- Cancels a scheduled, pending or retrying job. ARGV: name, job id, a random number (for
-- the expiries run first). Returns {now, seq, the job's fields before the cancel}.
if not load_meta() then
  return no_queue()
end
local now = now_ms()
tick(now, tonumber(ARGV[3]))
local id = ARGV[2]
local seq = redis.call('HGET', K_IDS, id)
if not seq then
  return fail('SLUICE_NOTFOUND', 'job ' .. id .. ' not found in queue ' .. quoted(NAME))
end
seq = tonumber(seq)
local k = job_key(seq)
local state = redis.call('HGET', k, 'state')
if state == 'completed' or state == 'dead' or state == 'cancelled' then
  return fail('SLUICE_PRECOND', 'job ' .. id .. ' is already ' .. state)
end
if state == 'leased' then
  local f = redis.call('HMGET', k, 'consumer', 'deadline')
  return fail('SLUICE_PRECOND', 'job ' .. id .. ' is leased by ' .. quoted(f[1] or '') ..
    ' until ' .. (f[2] or '0') .. ': ack or nack it, or wait for the lease to expire')
end
-- No lease finishes a cancelled job: its record names none (a retrying job's earlier
-- delivery is not the one that ended it), as the in-process queue's does.
redis.call('HDEL', k, 'nonce', 'consumer')
-- The record is taken before it finishes: history may keep nothing.
local before = redis.call('HGETALL', k)
unplace(seq)
mincr('cancelled', 1)
finish(seq, now, 'cancelled', nil)
wake()
return { now, seq, before }
