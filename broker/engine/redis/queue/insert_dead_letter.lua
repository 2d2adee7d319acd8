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
  -- Forget the old record entirely, live or finished, without counting it anywhere.
  local seq = tonumber(old)
  local state = redis.call('HGET', ok, 'state')
  if state == 'completed' or state == 'dead' or state == 'cancelled' then
    redis.call('LREM', K_HISTORY, 0, old)
  elseif state then
    if not end_lease(seq, now) then
      unplace(seq)
    end
    if redis.call('HDEL', ok, 'blocked') == 1 then
      mincr('blocked', -1)
    end
    redis.call('ZREM', K_LIVE, old)
    local okey = redis.call('HGET', ok, 'okey')
    if okey then
      release_ordering_key(okey, seq, now)
    end
  end
  redis.call('DEL', ok)
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
wake()
return 1
