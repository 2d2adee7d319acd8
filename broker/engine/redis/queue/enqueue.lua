-- Stores a batch of jobs, all or none. ARGV: name, job count, then 9 values per job: id,
-- kind, payload, encoded headers, priority, run_at ('' for now), max attempts ('' for the
-- policy's), idempotency key and ordering key ('' for none, else '=' then the key).
-- Returns {id, duplicate (0/1)} per job. After the jobs comes the schema revision the
-- node checked the batch with: when the queue's current one differs, nothing is stored
-- (SLUICE_SCHEMA, with the current revision; see engine/redis/schema.rs). Then, when
-- `MERGED_COUNTS` is set, for a call that merges several requests (queue/coalesce.rs),
-- each request's job count in order; none for a single request. Idempotency keys then
-- behave as if the requests ran one after another: a key repeated within a request is a
-- duplicate of its first job, one repeated from an earlier request only while the window
-- lasts (not at 0 ms).
local schema_now = redis.call('HGET', B .. ':schema', 'cur') or '0'
local n = tonumber(ARGV[2])
local F = 9
if schema_now ~= ARGV[3 + n * F] then
  return fail('SLUICE_SCHEMA', schema_now)
end
if not load_meta(META_ENQUEUE) then
  return no_queue()
end
local now = now_ms()
if now >= mnum('due') then
  prune_idem(now)
end
local window = mnum('dedup_ms')
-- The job indexes (0-based) where a merged call's second and later requests start. The
-- script that includes this file says whether the counts follow the revision
-- (`MERGED_COUNTS`): the fire script's own arguments follow it instead.
local starts = {}
if MERGED_COUNTS then
  local at = 0
  for a = 4 + n * F, #ARGV do
    at = at + tonumber(ARGV[a])
    starts[at] = true
  end
end

-- The job an idempotency key names while its window lasts.
local function idem_get(key)
  local exp = redis.call('ZSCORE', K_IDEMEXP, key)
  if exp and tonumber(exp) > now then
    return redis.call('HGET', K_IDEM, key)
  end
  return nil
end

-- How many jobs are new: not duplicates of remembered keys or of each other. `seen`
-- holds the last request (1-based) that named each key: a repeat there is a duplicate,
-- and one from an earlier request too while the window outlasts this instant.
local seen = {}
local new = 0
local req = 1
for i = 0, n - 1 do
  if starts[i] then
    req = req + 1
  end
  local ik = ARGV[3 + i * F + 7]
  if ik == '' then
    new = new + 1
  else
    ik = string.sub(ik, 2)
    local before = seen[ik]
    local dup = before == req or (before ~= nil and window > 0)
    if not dup and not idem_get(ik) then
      new = new + 1
    end
    seen[ik] = req
  end
end
local live = redis.call('ZCARD', K_LIVE)
if live + new > mnum('max_depth') then
  return fail('SLUICE_FULL', 'queue ' .. quoted(NAME) .. ' is full: ' .. I(live) ..
    ' live jobs + ' .. I(new) .. ' new exceeds max_depth ' .. M.max_depth)
end

-- Keys stored by this request: a repeat in the request is a duplicate even when the
-- window (0 ms) is over before the request ends; an earlier request's key is found by
-- `idem_get` while its window lasts.
local stored = {}
local out = {}
-- Seqs for the new jobs, in order, after the queue's last (written back with the count
-- at the end, one HSET for both).
local seq = mnum('seq')
-- What the batch adds to the queue's sets, written once per batch (`call_many`).
local ids, live, ready, timers = {}, {}, {}, {}
local blocked = 0
local at_now = I(now)
for i = 0, n - 1 do
  if starts[i] then
    stored = {}
  end
  local b = 3 + i * F
  local id, kind, payload, headers = ARGV[b], ARGV[b + 1], ARGV[b + 2], ARGV[b + 3]
  local prio = math.min(tonumber(ARGV[b + 4]), 9)
  local run_at, max_att, ik, ok = ARGV[b + 5], ARGV[b + 6], ARGV[b + 7], ARGV[b + 8]
  local dup = nil
  if ik ~= '' then
    ik = string.sub(ik, 2)
    dup = stored[ik] or idem_get(ik)
  end
  if dup then
    out[#out + 1] = { dup, 1 }
  else
    seq = seq + 1
    local s = I(seq)
    local at = now
    if run_at ~= '' then
      at = math.min(math.max(tonumber(run_at), now), END)
    end
    local attempts = mnum('max_attempts')
    if max_att ~= '' then
      attempts = tonumber(max_att)
    end
    attempts = math.min(math.max(attempts, 1), 10000)
    -- Where `place` would put a new job: ready now, or a timer.
    local state = 'pending'
    local h = { 'id', id, 'kind', kind, 'payload', payload, 'headers', headers,
      'prio', I(prio), 'attempts', '0', 'max_att', I(attempts), 'state', state,
      'enq_at', at_now, 'run_at', I(at), 'upd_at', at_now }
    if ik ~= '' then
      stored[ik] = id
      redis.call('HSET', K_IDEM, ik, id)
      redis.call('ZADD', K_IDEMEXP, after(now, window), ik)
      due_by(after(now, window))
      h[#h + 1] = 'ikey'
      h[#h + 1] = ik
    end
    local active = true
    if ok ~= '' then
      ok = string.sub(ok, 2)
      h[#h + 1] = 'okey'
      h[#h + 1] = ok
      active = redis.call('RPUSH', ord_key(ok), s) == 1
    end
    if not active then
      h[#h + 1] = 'blocked'
      h[#h + 1] = 1
      blocked = blocked + 1
    elseif at > now then
      h[16] = 'scheduled'
      timers[#timers + 1] = I(at)
      timers[#timers + 1] = s
    else
      ready[#ready + 1] = ready_score(prio, seq)
      ready[#ready + 1] = s
      WOKE = WOKE + 1
    end
    redis.call('HSET', job_key(seq), unpack(h))
    ids[#ids + 1] = id
    ids[#ids + 1] = s
    live[#live + 1] = s
    live[#live + 1] = s
    out[#out + 1] = { id, 0 }
  end
end
call_many('HSET', K_IDS, ids)
call_many('ZADD', K_LIVE, live)
call_many('ZADD', K_READY, ready)
call_many('ZADD', K_TIMERS, timers)
if #timers > 0 then
  local first = END
  for i = 1, #timers, 2 do
    first = math.min(first, tonumber(timers[i]))
  end
  due_by(first)
end
if blocked > 0 then
  mincr('blocked', blocked)
end
if new > 0 then
  M.seq, M.enqueued = I(seq), I(mnum('enqueued') + new)
  redis.call('HSET', K_META, 'seq', M.seq, 'enqueued', M.enqueued)
end
rate_record('e', now, new)
named_by_producer()
wake()
return out
