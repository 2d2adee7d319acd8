-- Expires due leases and makes due timers visible. ARGV: name, a random number (backoff
-- jitter). Returns how many jobs changed (0 for a missing queue).
if not load_meta() then
  return 0
end
local changed = tick(now_ms(), tonumber(ARGV[2]))
wake()
return changed
