-- Acks a batch of leases, all or none: if any lease is stale nothing is applied. ARGV:
-- name, count, then per ack: seq, nonce (hex), result ('' for none, else '=' then the
-- bytes). Returns {applied (0/1), then per ack 'live', 'acked' (a repeat ack: no change)
-- or why it is stale}.
local n = tonumber(ARGV[2])
local out = { 0 }
if not load_meta() then
  for i = 1, n do
    out[#out + 1] = 'queue ' .. quoted(NAME) .. ' no longer exists'
  end
  return out
end
local now = now_ms()
local ok = true
for i = 0, n - 1 do
  local why = check_lease(tonumber(ARGV[3 + i * 3]), ARGV[4 + i * 3], now)
  if why ~= 'live' and why ~= 'acked' then
    ok = false
  end
  out[#out + 1] = why
end
if not ok then
  return out
end
local acked = 0
for i = 0, n - 1 do
  local seq, nonce, result = tonumber(ARGV[3 + i * 3]), ARGV[4 + i * 3], ARGV[5 + i * 3]
  -- A lease named twice is acked once: the second finds it settled.
  if redis.call('ZSCORE', K_LEASED, I(seq)) and jget(seq, 'nonce') == nonce then
    local name = end_lease(seq, now)
    if name then
      local c = consumer_get(name)
      c.d = c.d + 1
      c.s = now
      consumer_put(name, c)
    end
    mincr('completed', 1)
    acked = acked + 1
    local r = nil
    if result ~= '' then
      r = string.sub(result, 2)
    end
    finish(seq, now, 'completed', r)
  end
end
rate_record('a', now, acked)
out[1] = 1
wake()
return out
