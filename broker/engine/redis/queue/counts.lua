-- The queue's counters. ARGV: name. Returns {pending, scheduled, leased, retrying,
-- enqueued, completed, failed, dead, cancelled, oldest pending age ms, active consumers,
-- paused (0/1), max in flight, rate per second, rate burst, rate tokens, rate-limited ms,
-- in-flight-limited ms, jobs enqueued and jobs acked over the rate window, created by a
-- consumer (0/1)}.
if not load_meta() then
  return no_queue()
end
local now = now_ms()
local ready = redis.call('ZCARD', K_READY)
-- The oldest visible job: the front of each priority band is its oldest (FIFO by seq).
local oldest = 0
for p = 0, 9 do
  local front = redis.call('ZRANGEBYSCORE', K_READY, p * 17592186044416,
    '(' .. I((p + 1) * 17592186044416), 'LIMIT', 0, 1)
  if front[1] then
    local since = tonumber(jget(front[1], 'run_at'))
    oldest = math.max(oldest, now - since)
  end
end
local active = 0
local all = redis.call('HVALS', K_CONSUMERS)
for _, raw in ipairs(all) do
  local c = cjson.decode(raw)
  if c.h > 0 or c.s + 60000 > now then
    active = active + 1
  end
end
local tokens = 0
if mnum('rate_ps') > 0 then
  tokens = math.floor(bucket_milli(now) / 1000)
end
local retrying = mnum('retrying')
local paused = 0
if M.paused == '1' then
  paused = 1
end
-- Held back by the rate limit: not past now (a wait counted ahead shows as it happens).
local rate_limited = math.max(0, mnum('rl_ms') - math.max(0, mnum('rl_until') - now))
local in_flight_limited = mnum('if_ms')
if M.if_since then
  in_flight_limited = in_flight_limited + math.max(0, now - tonumber(M.if_since))
end
-- The events of the seconds in the window ending now (`RateMeter::per_second`).
local second = math.floor(now / 1000)
local window = { e = 0, a = 0 }
local r = redis.call('HGETALL', K_RATES)
local fields = {}
for i = 1, #r, 2 do
  fields[r[i]] = r[i + 1]
end
for _, kind in ipairs({ 'e', 'a' }) do
  for slot = 0, RATE_WINDOW - 1 do
    local s = tonumber(fields[kind .. 's' .. slot] or '-1')
    if s >= 0 and s + RATE_WINDOW > second and s <= second then
      window[kind] = window[kind] + tonumber(fields[kind .. slot] or '0')
    end
  end
end
return { ready + mnum('blocked'), redis.call('ZCARD', K_TIMERS) - retrying,
  redis.call('ZCARD', K_LEASED), retrying, mnum('enqueued'), mnum('completed'),
  mnum('failed'), mnum('dead'), mnum('cancelled'), oldest, active, paused,
  mnum('max_in_flight'), mnum('rate_ps'), mnum('rate_burst'), tokens, rate_limited,
  in_flight_limited, window.e, window.a, mnum('by_consumer') }
