-- Step 2 of a redrive: puts a parked dead letter back into this (its origin) queue,
-- once. ARGV: name, the move's token, id, kind, payload, encoded headers (broker headers
-- already stripped), priority. A token in `:rdseen` means an earlier try stored it:
-- returns 0 and changes nothing. Otherwise, as the in-process `Queue::restore`: any
-- record with this id (its dead record in history, usually) is forgotten, and the job
-- starts over as an ordinary pending job (attempts reset, the queue's max attempts, no
-- origin), ignoring max depth (a job already taken out must land); returns 1. The token
-- stays in `:rdseen` until step 4 (redrive_forget.lua) drops it; tokens older than a
-- week are dropped here (left by a node that stopped between steps 3 and 4).
if not load_meta() then
  return no_queue()
end
local now = now_ms()
local K_RDSEEN = B .. ':rdseen'
local token, id = ARGV[2], ARGV[3]
if redis.call('ZSCORE', K_RDSEEN, token) then
  return 0
end
redis.call('ZREMRANGEBYSCORE', K_RDSEEN, '-inf', now - 604800000)
local old = redis.call('HGET', K_IDS, id)
if old then
  forget_record(old, now)
end
local seq = redis.call('HINCRBY', K_META, 'seq', 1)
local k = job_key(seq)
local attempts = math.min(math.max(mnum('max_attempts'), 1), 10000)
redis.call('HSET', k, 'id', id, 'kind', ARGV[4], 'payload', ARGV[5], 'headers', ARGV[6],
  'prio', I(math.min(tonumber(ARGV[7]), 9)), 'attempts', 0, 'max_att', I(attempts),
  'state', 'pending', 'enq_at', I(now), 'run_at', I(now), 'upd_at', I(now))
redis.call('HSET', K_IDS, id, I(seq))
redis.call('ZADD', K_LIVE, seq, I(seq))
redis.call('ZADD', K_RDSEEN, now, token)
place(seq, now)
named_by_producer()
wake()
return 1
