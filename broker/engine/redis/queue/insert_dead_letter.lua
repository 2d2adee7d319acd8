-- Stores a dead letter from another queue in this (dead-letter) queue, once. ARGV: name,
-- token (`<origin>/<seq>`: one death of one job), id, kind, payload, encoded headers,
-- priority, origin. A record with this id and token means an earlier try moved it
-- already: returns 0 and changes nothing. Any other record with this id (the job died
-- here before) is replaced. Dead letters ignore max depth: losing them would be a silent
-- drop. Returns 1 when stored.
if not load_meta() then
  return no_queue()
end
local now = now_ms()
local token, id = ARGV[2], ARGV[3]
local old = redis.call('HGET', K_IDS, id)
if old then
  local ok = B .. ':job:' .. old
  if redis.call('HGET', ok, 'dltoken') == token then
    return 0
  end
  forget_record(old, now)
end
local seq = redis.call('HINCRBY', K_META, 'seq', 1)
local k = job_key(seq)
local attempts = math.min(math.max(mnum('max_attempts'), 1), 10000)
redis.call('HSET', k, 'id', id, 'kind', ARGV[4], 'payload', ARGV[5], 'headers', ARGV[6],
  'prio', I(math.min(tonumber(ARGV[7]), 9)), 'attempts', 0, 'max_att', I(attempts),
  'state', 'pending', 'enq_at', I(now), 'run_at', I(now), 'upd_at', I(now),
  'origin', ARGV[8], 'dltoken', token)
redis.call('HSET', K_IDS, id, I(seq))
redis.call('ZADD', K_LIVE, seq, I(seq))
place(seq, now)
mincr('enqueued', 1)
named_by_producer()
wake()
return 1
