-- Shared by every queue script: the top of the queue library (see queue/library.rs),
-- run once when Redis loads it. Each call starts with `begin`, which sets the call's
-- state below from its keys and arguments. KEYS[1] is the queue's key prefix
-- `sluice:{q:<name>}`; every other key is built from it, so it carries the same hash tag
-- and stays in the queue's cluster slot. ARGV[1] is the queue name, for messages.
local B, NAME
local K_META, K_READY, K_TIMERS, K_LEASED, K_LIVE, K_IDS, K_IDEM, K_IDEMEXP
local K_HISTORY, K_OUTBOX, K_CONSUMERS, K_WAKE, K_PAUSE
-- Waiters about to wait for jobs, by token, scored by when their note runs out
-- (waiting.lua).
local K_WAITING
-- The enqueue and ack rates: per-second counts in 10 slots (see `rate_record`).
local K_RATES
-- The call's keys and arguments, for a body that runs another body (library.rs's glue).
local CALL_KEYS, CALL_ARGV
-- A test's clock (test builds only, see queue/test_clock.rs): a last argument
-- "\0now=<ms>" is the time, taken off ARGV before the body reads it.
local TEST_NOW
-- Redis's time, read once per call (`now_ms`).
local NOW
-- The meta hash as a table (`load_meta`), and whether a body run after another in the
-- same call (ack-and-lease) goes on using it instead of reading the hash again: every
-- write to the hash in the bodies goes through `M` too (`mincr`, and each HSET/HDEL beside
-- its `M` field).
local M, KEEP_META
-- Jobs made visible by the call, and whether the call may also have taken visible jobs
-- away, or woke without making any visible (`wake`).
local WOKE, READY_UNSURE
-- Consumer records read or written by the call, and those to write at its end (see
-- `consumer_get`).
local CONSUMERS, UNWRITTEN
-- Whether an enqueue call passes each merged request's job count (enqueue.lua).
local MERGED_COUNTS

local function begin(keys, argv)
  -- The key names depend on the prefix alone, and library state lasts between calls: a
  -- queue's calls in a row (a busy queue's) build them once.
  if keys[1] ~= B then
    B = keys[1]
    K_META = B .. ':meta'
    K_READY = B .. ':ready'
    K_TIMERS = B .. ':timers'
    K_LEASED = B .. ':leased'
    K_LIVE = B .. ':live'
    K_IDS = B .. ':ids'
    K_IDEM = B .. ':idem'
    K_IDEMEXP = B .. ':idemexp'
    K_HISTORY = B .. ':history'
    K_OUTBOX = B .. ':outbox'
    K_CONSUMERS = B .. ':consumers'
    K_WAKE = B .. ':wake'
    K_PAUSE = B .. ':pause'
    K_WAITING = B .. ':waiting'
    K_RATES = B .. ':rates'
  end
  NAME = argv[1]
  CALL_KEYS, CALL_ARGV = keys, argv
  TEST_NOW = nil
  if string.sub(argv[#argv] or '', 1, 5) == '\0now=' then
    TEST_NOW = tonumber(string.sub(argv[#argv], 6))
    argv[#argv] = nil
  end
  NOW = nil
  M, KEEP_META = nil, false
  WOKE, READY_UNSURE = 0, false
  CONSUMERS, UNWRITTEN = {}, nil
  MERGED_COUNTS = false
end

-- Integers as decimal text: Lua's own number formatting switches to exponents past 14
-- digits, and Rust parses these fields as u64.
local function I(n)
  return string.format('%d', n)
end

-- `redis.call(cmd, key, items...)` in chunks: a batch costs a call per 1,000 arguments
-- rather than one per job (`unpack` is bounded by Lua's stack). `items` holds whole
-- pairs (score and member, field and value), and 1,000 is even, so no pair is split.
-- Returns the last call's reply (nil when `items` is empty).
local function call_many(cmd, key, items)
  local reply = nil
  local n = #items
  local i = 1
  while i <= n do
    local j = math.min(i + 999, n)
    reply = redis.call(cmd, key, unpack(items, i, j))
    i = j + 1
  end
  return reply
end

-- The meta and rates hashes are read and written several times in every call. Stored as
-- a listpack (Redis's choice for a small hash) each of those accesses scans every field;
-- a hash holding a value longer than Redis's default `hash-max-listpack-value` (64 bytes)
-- is kept as a hash table instead, where each is one lookup (about 5% of an enqueue's
-- instructions, measured with callgrind: BENCHMARKS.md). The field changes nothing else:
-- no script reads it.
local HASH_TABLE_NOTE = 'kept as a hash table: this value is longer than hash-max-listpack-value'

local function keep_as_hash_table(key)
  redis.call('HSET', key, 'layout', HASH_TABLE_NOTE)
end

-- The end of time: Lua numbers are doubles, exact up to 2^53, so times and delays
-- saturate there (285 000 years from now) rather than at u64::MAX.
local END = 9007199254740991

-- `now + delay`, saturating at the end of time.
local function after(now, delay)
  return math.min(now + delay, END)
end

local function job_key(seq)
  return B .. ':job:' .. I(seq)
end

local function ord_key(k)
  return B .. ':ord:' .. k
end

local function dl_key(seq)
  return B .. ':dl:' .. I(seq)
end

-- Redis's clock, so every node agrees on time; read once per call (a call is atomic, so
-- one instant is its time), which spares a call made of parts (ack-and-lease) a `TIME`
-- per part.
local function now_ms()
  if TEST_NOW then
    return TEST_NOW
  end
  if not NOW then
    local t = redis.call('TIME')
    NOW = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end
  return NOW
end

local function fail(code, msg)
  return redis.error_reply(code .. ' ' .. msg)
end

local function quoted(s)
  return '"' .. s .. '"'
end

local function no_queue()
  return fail('SLUICE_NOTFOUND', 'queue ' .. quoted(NAME) .. ' does not exist')
end

-- A meta table read in part (`load_meta` with fields): a field it lacks is read when
-- first asked for, and kept for the call. An absent field reads as false, as in `HMGET`.
local META_REST = {
  __index = function(m, field)
    local value = redis.call('HGET', K_META, field)
    rawset(m, field, value)
    return value
  end,
}

-- Fields the hot bodies read, each list led by `seq`, which every queue has from its
-- creation (define.lua), so its absence means no queue. Reading these few with one
-- `HMGET` instead of the whole hash (about 30 fields, the encoded policy and every
-- counter) saves most of the meta read's Lua time (BENCHMARKS.md, issue 19).
local META_ENQUEUE = { 'seq', 'due', 'dedup_ms', 'max_depth', 'max_attempts', 'esec',
  'by_consumer', 'enqueued' }
local META_LEASE = { 'seq', 'due', 'paused', 'max_in_flight', 'rate_ps', 'vis' }
local META_ACK = { 'seq', 'if_since', 'history_limit', 'asec' }
-- Both parts' fields (each once), built when the library loads (where Lua's library
-- functions such as `ipairs` are not yet available, hence the plain loops).
local META_ACK_LEASE = {}
do
  local seen = {}
  local parts = { META_ACK, META_LEASE }
  for p = 1, #parts do
    local list = parts[p]
    for i = 1, #list do
      if not seen[list[i]] then
        seen[list[i]] = true
        META_ACK_LEASE[#META_ACK_LEASE + 1] = list[i]
      end
    end
  end
end

-- Reads the meta hash into `M`: the whole hash, or with `fields` those fields (the others
-- when first asked for, `META_REST`). False if the queue does not exist. Absent fields
-- read as nil or false: the bodies test them only for truth or with `or`.
local function load_meta(fields)
  if KEEP_META and M then
    return true
  end
  if fields then
    local raw = redis.call('HMGET', K_META, unpack(fields))
    if not raw[1] then
      return false
    end
    M = setmetatable({}, META_REST)
    for i, field in ipairs(fields) do
      M[field] = raw[i]
    end
    return true
  end
  local raw = redis.call('HGETALL', K_META)
  if #raw == 0 then
    return false
  end
  M = {}
  for i = 1, #raw, 2 do
    M[raw[i]] = raw[i + 1]
  end
  return true
end

local function mnum(field)
  return tonumber(M[field] or '0') or 0
end

-- Something named the queue on purpose (a job came in, a policy or pause was set): it is
-- no longer only a consumer's (`Queue::named_by_producer`). A binding's jobs need a
-- policy that names the binding, so that set cleared it already.
local function named_by_producer()
  if M.by_consumer then
    redis.call('HDEL', K_META, 'by_consumer')
    M.by_consumer = false
  end
end

-- Keeps `M` in step, so a later part of the same script (ack-and-lease) can go on
-- reading it instead of the hash.
local function mincr(field, by)
  local value = redis.call('HINCRBY', K_META, field, by)
  if M then
    M[field] = I(value)
  end
end

-- `due` in the meta hash is a time at or before the earliest score in the leased, timers
-- and idempotency-window sets, so `tick` skips its three scans until then: on a busy
-- queue whose leases are acked in time they run about once a visibility timeout instead
-- of on every lease. Every ZADD to those sets goes through `due_by`; each scan sets `due`
-- anew (`rescan_due`). Absent (a queue from before the field) reads as 0: scan now.
local function due_by(t)
  local cur
  if M then
    cur = M.due
  else
    cur = redis.call('HGET', K_META, 'due')
  end
  if cur and t < tonumber(cur) then
    redis.call('HSET', K_META, 'due', I(t))
    if M then
      M.due = I(t)
    end
  end
end

-- The seconds a rate is counted over: `domain::rate::RateMeter`'s window.
local RATE_WINDOW = 10

-- Counts `n` events of `kind` ('e' enqueued, 'a' acked) at `now`, as `RateMeter::record`
-- does: slot `second % RATE_WINDOW` holds the count (field `<kind><slot>`) of the second
-- in field `<kind>s<slot>`, and a new second overwrites the slot. So the hash never holds
-- more than 40 fields and needs no pruning.
local function rate_record(kind, now, n)
  if n <= 0 then
    return
  end
  local second = math.floor(now / 1000)
  local slot = I(second % RATE_WINDOW)
  local sec = I(second)
  -- The meta hash (read already) names the second this kind last counted in, `<kind>sec`:
  -- while that is this second, its slot holds this second, and one command counts.
  local mark = kind .. 'sec'
  if M and M[mark] == sec then
    redis.call('HINCRBY', K_RATES, kind .. slot, n)
    return
  end
  if redis.call('HGET', K_RATES, kind .. 's' .. slot) == sec then
    redis.call('HINCRBY', K_RATES, kind .. slot, n)
  else
    redis.call('HSET', K_RATES, kind .. 's' .. slot, sec, kind .. slot, I(n))
  end
  if M then
    redis.call('HSET', K_META, mark, sec)
    M[mark] = sec
  end
end

-- Counts jobs made visible, so the script ends with a wake-up for long polls: only if
-- some waiter's note lasts (waiting.lua) and some jobs are still visible when it ends
-- (sure without a look unless the call took some away, `READY_UNSURE`). (Without a note
-- nobody waits: every waiter looks again after noting itself.)
local function wake()
  if WOKE > 0
    and #redis.call('ZRANGEBYSCORE', K_WAITING, I(now_ms()), '+inf', 'LIMIT', '0', '1') > 0
    and (not READY_UNSURE or redis.call('ZCARD', K_READY) > 0) then
    redis.call('SPUBLISH', K_WAKE, I(WOKE))
  end
end

-- As text, as every time and score passed to `redis.call` is: Redis formats a Lua number
-- with `%.17g`, which for a time in ms or a score costs about as much as the command it
-- is passed to (measured with callgrind, BENCHMARKS.md).
local function ready_score(prio, seq)
  return I((9 - prio) * 17592186044416 + seq)
end

local function jget(seq, field)
  return redis.call('HGET', job_key(seq), field)
end

-- Consumers: one JSON object per name (a address, h leases held, s last seen, d done,
-- f failed).
-- A consumer's record from its stored JSON (`raw` nil: a consumer not seen before).
local function consumer_decode(raw)
  if raw then
    return cjson.decode(raw)
  end
  return { a = '', h = 0, s = 0, d = 0, f = 0 }
end

-- `CONSUMERS` holds the records this call has read or written, by name: a record is
-- read from Redis once per call. When `UNWRITTEN` is a table (ack-and-lease sets it), the
-- records to write at the end of the call (`consumer_flush`) instead of at each change:
-- its ack and its lease change the same worker's record, which is then written once.
local function consumer_get(name)
  local c = CONSUMERS[name]
  if c == nil then
    c = consumer_decode(redis.call('HGET', K_CONSUMERS, name))
    CONSUMERS[name] = c
  end
  return c
end

local function consumer_put(name, c)
  CONSUMERS[name] = c
  if UNWRITTEN then
    UNWRITTEN[name] = true
  else
    redis.call('HSET', K_CONSUMERS, name, cjson.encode(c))
  end
end

-- Writes the records `consumer_put` held back, and writes at once again.
local function consumer_flush()
  for name in pairs(UNWRITTEN or {}) do
    redis.call('HSET', K_CONSUMERS, name, cjson.encode(CONSUMERS[name]))
  end
  UNWRITTEN = nil
end

-- Puts an active job into ready or timers by its run time.
local function place(seq, now)
  local k = job_key(seq)
  local run_at = tonumber(redis.call('HGET', k, 'run_at'))
  redis.call('HSET', k, 'upd_at', I(now))
  if run_at > now then
    if tonumber(redis.call('HGET', k, 'attempts')) == 0 then
      redis.call('HSET', k, 'state', 'scheduled')
    else
      redis.call('HSET', k, 'state', 'retrying')
      mincr('retrying', 1)
    end
    redis.call('ZADD', K_TIMERS, run_at, I(seq))
    due_by(run_at)
  else
    redis.call('HSET', k, 'state', 'pending')
    local prio = tonumber(redis.call('HGET', k, 'prio'))
    redis.call('ZADD', K_READY, ready_score(prio, seq), I(seq))
    WOKE = WOKE + 1
  end
end

-- Removes an active, unleased job from ready or timers.
local function unplace(seq)
  local k = job_key(seq)
  if redis.call('HEXISTS', k, 'blocked') == 1 then
    return
  end
  local state = redis.call('HGET', k, 'state')
  if state == 'pending' then
    redis.call('ZREM', K_READY, I(seq))
    READY_UNSURE = true
  elseif state == 'scheduled' or state == 'retrying' then
    if state == 'retrying' then
      mincr('retrying', -1)
    end
    redis.call('ZREM', K_TIMERS, I(seq))
  end
end

-- A lease ended, so a slot under max_in_flight is free again: the open held-back
-- interval ends (as `Queue::note_lease_ended`).
local function held_back_ends(now)
  if M.if_since then
    mincr('if_ms', math.max(0, now - tonumber(M.if_since)))
    redis.call('HDEL', K_META, 'if_since')
    M.if_since = false
  end
end

-- Ends the live lease of `seq`; returns its consumer (or nil).
local function end_lease(seq, now)
  if redis.call('ZREM', K_LEASED, I(seq)) == 0 then
    return nil
  end
  held_back_ends(now)
  local k = job_key(seq)
  redis.call('HDEL', k, 'deadline')
  local name = redis.call('HGET', k, 'consumer')
  if name then
    local c = consumer_get(name)
    c.h = math.max(0, c.h - 1)
    consumer_put(name, c)
  end
  return name
end

-- A history entry: '<seq>:<id>', so trimming knows the id without reading the job.
-- Entries written before ids were added are '<seq>' alone.
local function history_entry(seq, id)
  return I(seq) .. ':' .. (id or '')
end

-- The seq (as text) and id of a history entry; the id is nil in the older form.
local function history_parts(entry)
  local seq, id = string.match(entry, '^(%d+):(.*)$')
  if seq then
    return seq, id
  end
  return entry, nil
end

-- The seq (as text) of a history entry, either form.
local function history_seq(entry)
  return (history_parts(entry))
end

-- Trims history to the policy's limit; `len` is its length when the caller knows it (an
-- RPUSH answers it), sparing an LLEN.
local function trim_history(len)
  local over = (len or redis.call('LLEN', K_HISTORY)) - mnum('history_limit')
  -- In chunks, so a limit lowered by a million stays within Lua's stack.
  while over > 0 do
    local entries = redis.call('LPOP', K_HISTORY, math.min(over, 500))
    over = over - #entries
    local seqs, keys, ids = {}, {}, {}
    for i, entry in ipairs(entries) do
      local seq, id = history_parts(entry)
      seqs[i] = seq
      keys[i] = B .. ':job:' .. seq
      ids[i] = id or redis.call('HGET', keys[i], 'id') or ''
    end
    -- An id's entry goes only while it still names this record (a redrive may have given
    -- the id a newer one).
    local named = redis.call('HMGET', K_IDS, unpack(ids))
    local gone = {}
    for i, seq in ipairs(seqs) do
      if ids[i] ~= '' and named[i] == seq then
        gone[#gone + 1] = ids[i]
      end
    end
    if #gone > 0 then
      redis.call('HDEL', K_IDS, unpack(gone))
    end
    redis.call('DEL', unpack(keys))
  end
end

-- The next job of an ordering key becomes active when the front one finishes.
local function release_ordering_key(key, seq, now)
  local lk = ord_key(key)
  local front = redis.call('LINDEX', lk, 0)
  redis.call('LREM', lk, 1, I(seq))
  if front == I(seq) then
    local nxt = redis.call('LINDEX', lk, 0)
    if nxt then
      local n = tonumber(nxt)
      redis.call('HDEL', job_key(n), 'blocked')
      mincr('blocked', -1)
      place(n, now)
    end
  end
end

-- Moves a live job that reaches a final state into history, frees its ordering key,
-- queues its dead letter, and trims history.
local function finish(seq, now, state, result)
  local k = job_key(seq)
  redis.call('HSET', k, 'state', state, 'fin_at', I(now), 'upd_at', I(now))
  if redis.call('HDEL', k, 'blocked') == 1 then
    mincr('blocked', -1)
  end
  if result then
    redis.call('HSET', k, 'result', result)
  end
  redis.call('ZREM', K_LIVE, I(seq))
  local f = redis.call('HMGET', k, 'okey', 'id')
  local len = redis.call('RPUSH', K_HISTORY, history_entry(seq, f[2]))
  local okey = f[1]
  if okey then
    release_ordering_key(okey, seq, now)
  end
  if state == 'dead' and redis.call('HEXISTS', k, 'dlq') == 1 then
    -- A copy, since history may drop the record before the dead letter moves.
    redis.call('COPY', k, dl_key(seq), 'REPLACE')
    redis.call('RPUSH', K_OUTBOX, I(seq))
  end
  trim_history(len)
end

-- Delay before retry number `retry`; `rand` is a node-made random number for jitter.
local function backoff_ms(retry, rand, seq)
  local sched = M.b_sched or ''
  if sched ~= '' then
    local delays = {}
    for d in string.gmatch(sched, '%d+') do
      delays[#delays + 1] = tonumber(d)
    end
    local i = math.min(math.max(retry, 1), #delays)
    return delays[i] or 0
  end
  local shift = math.min(math.max(retry - 1, 0), 40)
  local full = math.min(mnum('b_init') * (2 ^ shift), mnum('b_max'))
  if M.b_jitter == '1' and full > 1 then
    local lo = math.floor(full / 2)
    -- Several jobs failing in one script share `rand`: their seqs spread it.
    return lo + ((rand + seq * 2654435761) % (full - lo + 1))
  end
  return full
end

-- Fails the delivery of `seq` at `now`: retry later, or die.
local function fail_attempt(seq, now, err, retry_delay, dead_letter, rand)
  local name = end_lease(seq, now)
  if name then
    local c = consumer_get(name)
    c.f = c.f + 1
    consumer_put(name, c)
  end
  mincr('failed', 1)
  local k = job_key(seq)
  local attempts = tonumber(redis.call('HGET', k, 'attempts'))
  local last = attempts >= tonumber(redis.call('HGET', k, 'max_att'))
  redis.call('HSET', k, 'error', err, 'upd_at', I(now))
  if dead_letter or last then
    mincr('dead', 1)
    if (M.dlq or '') ~= '' then
      redis.call('HSET', k, 'dlq', M.dlq)
    end
    finish(seq, now, 'dead', nil)
    return -1
  end
  local delay = retry_delay or backoff_ms(attempts, rand, seq)
  local at = after(now, delay)
  redis.call('HSET', k, 'run_at', I(at))
  place(seq, now)
  return at
end

-- Forgets idempotency keys whose window ended.
local function prune_idem(now)
  local old = redis.call('ZRANGEBYSCORE', K_IDEMEXP, '-inf', I(now), 'LIMIT', '0', '1000')
  for _, key in ipairs(old) do
    redis.call('HDEL', K_IDEM, key)
    redis.call('ZREM', K_IDEMEXP, key)
  end
end

-- Sets `due` to the earliest score in the three sets (the end of time if all are empty).
local function rescan_due()
  local due = END
  for _, key in ipairs({ K_LEASED, K_TIMERS, K_IDEMEXP }) do
    local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
    if first[2] then
      due = math.min(due, tonumber(first[2]))
    end
  end
  redis.call('HSET', K_META, 'due', I(due))
  M.due = I(due)
end

-- Expires due leases (each a failed attempt at its deadline), makes due timers visible
-- and forgets idempotency keys whose window ended; nothing to do before `due`. Returns
-- how many jobs changed.
local function tick(now, rand)
  if now < mnum('due') then
    return 0
  end
  local changed = 0
  local at = I(now)
  local due = redis.call('ZRANGEBYSCORE', K_LEASED, '-inf', at, 'WITHSCORES')
  for i = 1, #due, 2 do
    local seq = tonumber(due[i])
    local deadline = tonumber(due[i + 1])
    fail_attempt(seq, deadline,
      'lease expired at ' .. I(deadline) .. ' (no ack within the visibility timeout)',
      nil, false, rand)
    changed = changed + 1
  end
  local timers = redis.call('ZRANGEBYSCORE', K_TIMERS, '-inf', at)
  for _, s in ipairs(timers) do
    local seq = tonumber(s)
    local k = job_key(seq)
    redis.call('ZREM', K_TIMERS, s)
    if redis.call('HGET', k, 'state') == 'retrying' then
      mincr('retrying', -1)
    end
    redis.call('HSET', k, 'state', 'pending', 'upd_at', at)
    local prio = tonumber(redis.call('HGET', k, 'prio'))
    redis.call('ZADD', K_READY, ready_score(prio, seq), s)
    WOKE = WOKE + 1
    changed = changed + 1
  end
  prune_idem(now)
  rescan_due()
  return changed
end

-- The rate limit's bucket: thousandths of a token held at `now`.
local function bucket_milli(now)
  local ps = mnum('rate_ps')
  local burst = mnum('rate_burst') * 1000
  if not M.tok then
    return burst
  end
  local gained = math.max(0, now - mnum('tok_at')) * ps
  return math.min(mnum('tok') + gained, burst)
end

-- How many jobs the limits let a lease take now, and which limit says so ('inflight' or
-- 'rate', the rate limit only when it allows fewer); nil without limits.
local function lease_room(now)
  local room, limit = nil, nil
  if mnum('max_in_flight') > 0 then
    room = math.max(0, mnum('max_in_flight') - redis.call('ZCARD', K_LEASED))
    limit = 'inflight'
  end
  if mnum('rate_ps') > 0 then
    local tokens = math.floor(bucket_milli(now) / 1000)
    if room == nil or tokens < room then
      room = tokens
      limit = 'rate'
    end
  end
  return room, limit
end

-- The stale-lease check shared by ack, nack and extend. Returns 'live', 'acked' or the
-- reason the lease is stale (the caller prefixes "lease <id> is stale: "); with 'live',
-- also the job's fields {id, state, attempts, nonce, deadline, consumer, okey, blocked},
-- so the caller reads the job once.
local function check_lease(seq, nonce, now)
  local k = job_key(seq)
  local f = redis.call('HMGET', k, 'id', 'state', 'attempts', 'nonce', 'deadline',
    'consumer', 'okey', 'blocked')
  local id, state, attempts, jn, deadline = f[1], f[2], f[3], f[4], f[5]
  if not id then
    return 'its job no longer exists (finished and evicted from history, or deleted)'
  end
  if state == 'completed' or state == 'dead' or state == 'cancelled' then
    if jn ~= nonce then
      return 'job ' .. id .. ' was delivered again since (attempt ' .. attempts .. ')'
    end
    if state == 'completed' then
      return 'acked'
    end
    return 'job ' .. id .. ' is ' .. state .. ' since this lease ended'
  end
  if state == 'leased' then
    if jn ~= nonce then
      return 'job ' .. id .. ' was delivered again since (attempt ' .. attempts .. ')'
    end
    if tonumber(deadline) > now then
      return 'live', f
    end
    return 'it expired at ' .. deadline .. ' (now ' .. I(now) ..
      '); the job will be delivered again'
  end
  return 'job ' .. id .. ' is ' .. state .. ' since this lease ended (attempt ' .. attempts .. ')'
end

-- Calls `each(seq, fields)` for every (seq, nonce) pair of `argv` from index `from` on
-- whose lease is still live (`check_lease`'s fields), in order, each checked just before
-- its call; leases settled, expired or delivered again meanwhile are left alone. Returns
-- how many were live. For the scripts that put back a stream's leases (release, unlease).
local function each_live_lease(argv, from, now, each)
  local n = 0
  for i = from, #argv - 1, 2 do
    local seq = tonumber(argv[i])
    local why, f = check_lease(seq, argv[i + 1], now)
    if why == 'live' then
      each(seq, f)
      n = n + 1
    end
  end
  return n
end

-- Forgets the record of job `seq` (as a string, from `:ids`) entirely, live or finished,
-- without counting it anywhere: a dead letter or a redriven job that replaces an earlier
-- record of the same id.
local function forget_record(old, now)
  local ok = B .. ':job:' .. old
  local seq = tonumber(old)
  local f = redis.call('HMGET', ok, 'state', 'id')
  local state = f[1]
  if state == 'completed' or state == 'dead' or state == 'cancelled' then
    if redis.call('LREM', K_HISTORY, 0, history_entry(seq, f[2])) == 0 then
      redis.call('LREM', K_HISTORY, 0, old)
    end
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
