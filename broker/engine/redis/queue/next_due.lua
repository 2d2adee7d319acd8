-- The earliest time something is due: a timer, a lease deadline, or the rate limit's
-- next token while it holds visible jobs back. ARGV: name. Returns it, or nil.
if not load_meta() then
  return nil
end
local due = nil
local function earlier(t)
  if t and (due == nil or t < due) then
    due = t
  end
end
local t = redis.call('ZRANGE', K_TIMERS, 0, 0, 'WITHSCORES')
earlier(tonumber(t[2]))
local l = redis.call('ZRANGE', K_LEASED, 0, 0, 'WITHSCORES')
earlier(tonumber(l[2]))
if mnum('rate_ps') > 0 and M.paused ~= '1' and redis.call('ZCARD', K_READY) > 0 then
  local in_flight_full = mnum('max_in_flight') > 0 and
    redis.call('ZCARD', K_LEASED) >= mnum('max_in_flight')
  local now = now_ms()
  local milli = bucket_milli(now)
  if not in_flight_full and milli < 1000 then
    local at = math.max(mnum('tok_at'), now)
    earlier(at + math.ceil((1000 - milli) / mnum('rate_ps')))
  end
end
return due
