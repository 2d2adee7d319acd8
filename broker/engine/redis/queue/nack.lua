-- Fails a delivery. ARGV: name, seq, nonce, error, retry delay ms ('' for the backoff's),
-- dead letter ('1'/'0'), a random number (backoff jitter). Returns {'dead'} or {'retry',
-- run at, now}.
if not load_meta() then
  return fail('SLUICE_STALE', 'queue ' .. quoted(NAME) .. ' no longer exists')
end
local now = now_ms()
local seq = tonumber(ARGV[2])
local why, f = check_lease(seq, ARGV[3], now)
if why == 'acked' then
  return fail('SLUICE_STALE', 'its job was already acked')
elseif why ~= 'live' then
  return fail('SLUICE_STALE', why)
end
-- The worker holding the lease, as check_lease read it.
local name = f[6]
local delay = nil
if ARGV[5] ~= '' then
  delay = tonumber(ARGV[5])
end
local at = fail_attempt(seq, now, ARGV[4], delay, ARGV[6] == '1', tonumber(ARGV[7]))
if name then
  local c = consumer_get(name)
  c.s = now
  consumer_put(name, c)
end
wake()
if at < 0 then
  return { 'dead' }
end
return { 'retry', at, now }
