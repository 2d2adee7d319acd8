-- Puts back what a closed consume stream held, at once and as failed attempts, in one
-- script, so they become visible together (as on one node). ARGV: name, error, a random
-- number (backoff jitter), then the seq and nonce (hex) of each delivery. Deliveries
-- settled or expired meanwhile are left alone. Returns how many were put back.
if not load_meta() then
  return 0
end
local now = now_ms()
local released = each_live_lease(ARGV, 4, now, function(seq, f)
  -- The worker's name, as check_lease read it with the lease.
  local name = f[6]
  fail_attempt(seq, now, ARGV[2], 0, false, tonumber(ARGV[3]))
  if name then
    local c = consumer_get(name)
    c.s = now
    consumer_put(name, c)
  end
end)
if released > 0 then
  wake()
end
return released
