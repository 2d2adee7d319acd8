-- Expires due leases and makes due timers visible. ARGV: name, a random number (backoff
-- jitter). Returns {how many jobs changed, dead letters waiting in the outbox} ({0, 0}
-- for a missing queue), so the sweep moves dead letters only when there are some.
if not load_meta() then
  return { 0, 0 }
end
local changed = tick(now_ms(), tonumber(ARGV[2]))
wake()
return { changed, redis.call('LLEN', K_OUTBOX) }
