-- Shared by every topic script (prepended to each one's source).
--
-- A topic's keys all start with the base key passed in KEYS[1] (`sluice:{t:<name>}`), so
-- every key a script builds from it (`:meta`, `:log`, `:idem:...`) and the `:wake` shard
-- channel hash to the base's slot: on a Redis Cluster the script stays on one node.
--
-- `:log` is a stream with explicit ids `<seq>-1`, seq from 1 and gap-free. Each entry's
-- first three fields are, in this order: `t` (publish time, ms, non-decreasing), `c`
-- (cumulative payload bytes of the topic up to and including this message) and `p`
-- (payload); then `k` (application key) if not empty and `h.<name>` per header. Since
-- times and cumulative bytes only grow, "first message at or after a time" and "first
-- message from which the retained bytes fit" are binary searches over the sequence
-- range, each probe one XRANGE of one id: no separate time index, and retention costs
-- O(log n) probes however many messages it evicts.
--
-- `:meta` is a hash: first (oldest retained seq; = next when empty), next (the next seq
-- to assign), cum (cumulative bytes of the last message), last_time, epoch (a nonce set
-- when the topic is created: idempotency keys and subscribers' cursors belong to one
-- incarnation of a name), max_messages, max_bytes, max_age_ms, gaps (gap notices sent by
-- subscriptions, gap.lua), psec (the second the publish rate last counted in). `:subs`
-- is a hash of each node's count of open subscriptions (subs_put.lua); `:rates` holds the
-- publish counts of the last RATE_WINDOW seconds (publish.lua, stats.lua).

-- Numbers as Redis arguments: Lua would print large ones as `1.7e+12`.
local function num(x)
  return string.format('%.0f', x)
end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- The entry of sequence `seq` (which must be retained): publish time, cumulative bytes,
-- payload length.
local function probe(log, seq)
  local id = num(seq) .. '-1'
  local f = redis.call('XRANGE', log, id, id)[1][2]
  return tonumber(f[2]), tonumber(f[4]), string.len(f[6])
end

-- The smallest s in [lo, hi] for which pred(s) holds, given that pred is monotone and
-- holds at hi (never evaluated there).
local function first_true(lo, hi, pred)
  while lo < hi do
    local mid = math.floor((lo + hi) / 2)
    if pred(mid) then
      hi = mid
    else
      lo = mid + 1
    end
  end
  return lo
end

-- Evicts, oldest first, what retention no longer allows (more than max_messages, more
-- than max_bytes of payload, or published before now - max_age_ms), as
-- `domain::topic::Topic::enforce_retention` does: each limit is monotone in the oldest
-- retained sequence, so the new oldest one is the largest of the three answers.
-- Returns the oldest retained sequence.
local function enforce(meta, log, now)
  local m = redis.call('HMGET', meta, 'first', 'next', 'cum', 'max_messages', 'max_bytes', 'max_age_ms')
  local first, next, cum = tonumber(m[1]), tonumber(m[2]), tonumber(m[3])
  local max_messages, max_bytes, max_age = tonumber(m[4]), tonumber(m[5]), tonumber(m[6])
  local f = first
  if next - f > max_messages then
    f = next - max_messages
  end
  if f < next then
    local t, c, len = probe(log, f)
    if cum - (c - len) > max_bytes then
      f = first_true(f, next, function(s)
        local _, cs, ls = probe(log, s)
        return cum - (cs - ls) <= max_bytes
      end)
    end
    local min_time = now - max_age
    if f < next and (probe(log, f)) < min_time then
      f = first_true(f, next, function(s)
        return (probe(log, s)) >= min_time
      end)
    end
  end
  if f > first then
    redis.call('XTRIM', log, 'MINID', num(f) .. '-1')
    redis.call('HSET', meta, 'first', num(f))
  end
  return f
end

-- Creates the topic's meta hash if it does not exist; returns 1 if it did not.
local function ensure(meta, epoch, max_messages, max_bytes, max_age)
  if redis.call('EXISTS', meta) == 1 then
    return 0
  end
  redis.call('HSET', meta, 'first', 1, 'next', 1, 'cum', 0, 'last_time', 0, 'epoch', epoch,
    'max_messages', max_messages, 'max_bytes', max_bytes, 'max_age_ms', max_age)
  return 1
end

local base = KEYS[1]
local meta = base .. ':meta'
local log = base .. ':log'
local rates = base .. ':rates'

-- The seconds a rate is counted over: `domain::rate::WINDOW_SECS`.
local RATE_WINDOW = 10
