-- Acks a batch of leases, all or none: if any lease is stale nothing is applied. ARGV:
-- name, count, then per ack: seq, nonce (hex), result ('' for none, else '=' then the
-- bytes). Returns {applied (0/1), then per ack 'live', 'acked' (a repeat ack: no change)
-- or why it is stale}.
--
-- `finish` and `end_lease` for a whole batch: each job is read once (by `check_lease`)
-- and written once, and the sets, the history and the consumers' records are updated
-- once per batch, so Redis's work per acked job stays a few commands.
local n = tonumber(ARGV[2])
local out = { 0 }
if not load_meta(META_ACK) then
  for i = 1, n do
    out[#out + 1] = 'queue ' .. quoted(NAME) .. ' no longer exists'
  end
  return out
end
local now = now_ms()
local ok = true
local fields = {}
for i = 0, n - 1 do
  local why, f = check_lease(tonumber(ARGV[3 + i * 3]), ARGV[4 + i * 3], now)
  if why ~= 'live' and why ~= 'acked' then
    ok = false
  end
  fields[i] = f
  out[#out + 1] = why
end
if not ok then
  return out
end
local at = I(now)
local settled, ended, entries = {}, {}, {}
local by_consumer = {}
for i = 0, n - 1 do
  local seq, result = tonumber(ARGV[3 + i * 3]), ARGV[5 + i * 3]
  local f = fields[i]
  -- A lease named twice is acked once: the second finds it settled.
  if f and not settled[seq] then
    settled[seq] = true
    local s = I(seq)
    ended[#ended + 1] = s
    entries[#entries + 1] = history_entry(seq, f[1])
    -- The lease's `deadline` stays: it is read only while a job is leased.
    local k = job_key(seq)
    if result ~= '' then
      redis.call('HSET', k, 'state', 'completed', 'fin_at', at, 'upd_at', at,
        'result', string.sub(result, 2))
    else
      redis.call('HSET', k, 'state', 'completed', 'fin_at', at, 'upd_at', at)
    end
    if f[8] then
      redis.call('HDEL', k, 'blocked')
      mincr('blocked', -1)
    end
    if f[6] then
      by_consumer[f[6]] = (by_consumer[f[6]] or 0) + 1
    end
    if f[7] then
      release_ordering_key(f[7], seq, now)
    end
  end
end
local acked = #ended
if acked > 0 then
  call_many('ZREM', K_LEASED, ended)
  call_many('ZREM', K_LIVE, ended)
  local len = call_many('RPUSH', K_HISTORY, entries)
  held_back_ends(now)
  for name, count in pairs(by_consumer) do
    local c = consumer_get(name)
    c.h = math.max(0, c.h - count)
    c.d = c.d + count
    c.s = now
    consumer_put(name, c)
  end
  mincr('completed', acked)
  trim_history(len)
end
rate_record('a', now, acked)
out[1] = 1
wake()
return out
