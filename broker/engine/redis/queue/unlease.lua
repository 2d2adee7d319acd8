-- Puts back jobs that a node leased ahead for a consume stream and never delivered
-- (consume.rs, "lease-ahead"): visible again at once, as if never leased. The attempt is
-- not counted and the rate limit gets its tokens back. ARGV: name, then the seq and nonce
-- (hex) of each. Leases settled, expired or delivered again meanwhile are left alone.
-- Returns how many were put back.
if not load_meta() then
  return 0
end
local now = now_ms()
local back = each_live_lease(ARGV, 2, now, function(seq)
  end_lease(seq, now)
  local k = job_key(seq)
  redis.call('HINCRBY', k, 'attempts', -1)
  redis.call('HDEL', k, 'nonce', 'consumer')
  place(seq, now)
end)
if back > 0 and mnum('rate_ps') > 0 then
  local milli = math.min(bucket_milli(now) + back * 1000, mnum('rate_burst') * 1000)
  local at = math.max(mnum('tok_at'), now)
  redis.call('HSET', K_META, 'tok', I(milli), 'tok_at', I(at))
end
wake()
return back
