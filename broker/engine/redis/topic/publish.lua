-- Publishes a batch to one topic, creating it (with the default retention) if needed.
-- ARGV: epoch nonce (used if created), default max_messages, max_bytes, max_age_ms,
-- dedup window ms, the schema revision the node checked the batch with, then per message: idempotency key ('' for none, else '=' .. key),
-- application key, header count n, n name/value pairs, payload.
-- Returns {created (0/1), then per message its sequence, negated for a duplicate}.
-- A newer schema than the node's: nothing is written (see engine/redis/schema.rs).
local schema_now = redis.call('HGET', base .. ':schema', 'cur') or '0'
if schema_now ~= ARGV[6] then
  return redis.error_reply('SLUICE_SCHEMA ' .. schema_now)
end
local created = ensure(meta, ARGV[1], ARGV[2], ARGV[3], ARGV[4])
local now = now_ms()
local m = redis.call('HMGET', meta, 'next', 'cum', 'last_time', 'epoch', 'psec')
local next, cum, epoch = tonumber(m[1]), tonumber(m[2]), m[4]
-- Publish times never go backwards, even if Redis's clock does (a failover).
local time = math.max(now, tonumber(m[3]))
local window = ARGV[5]
local out = { created }
local stored = 0
local i = 7
while i <= #ARGV do
  local idem, key, n = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  local headers = i + 3
  local payload = ARGV[headers + 2 * n]
  i = headers + 2 * n + 1
  local dedup = nil
  local original = nil
  if idem ~= '' then
    dedup = base .. ':idem:' .. epoch .. ':' .. string.sub(idem, 2)
    original = redis.call('GET', dedup)
  end
  if original then
    out[#out + 1] = -tonumber(original)
  else
    if dedup then
      redis.call('SET', dedup, num(next), 'PX', window)
    end
    cum = cum + string.len(payload)
    local args = { 'XADD', log, num(next) .. '-1', 't', num(time), 'c', num(cum), 'p', payload }
    if key ~= '' then
      args[#args + 1] = 'k'
      args[#args + 1] = key
    end
    for h = 0, n - 1 do
      args[#args + 1] = 'h.' .. ARGV[headers + 2 * h]
      args[#args + 1] = ARGV[headers + 2 * h + 1]
    end
    redis.call(unpack(args))
    out[#out + 1] = next
    next = next + 1
    stored = stored + 1
  end
end
if stored > 0 then
  -- The publish rate: per-second counts in RATE_WINDOW slots of `:rates` (field `p<slot>`,
  -- its second in `ps<slot>`), as `domain::rate::RateMeter` keeps them. The meta hash
  -- names the second last counted in (`psec`): while that is now, one HINCRBY counts.
  local second = math.floor(now / 1000)
  local slot = num(second % RATE_WINDOW)
  local sec = num(second)
  if m[5] == sec or redis.call('HGET', rates, 'ps' .. slot) == sec then
    redis.call('HINCRBY', rates, 'p' .. slot, stored)
  else
    redis.call('HSET', rates, 'ps' .. slot, sec, 'p' .. slot, num(stored))
  end
  redis.call('HSET', meta, 'next', num(next), 'cum', num(cum), 'last_time', num(time),
    'psec', sec)
  enforce(meta, log, now)
  redis.call('SPUBLISH', base .. ':wake', '1')
end
return out
