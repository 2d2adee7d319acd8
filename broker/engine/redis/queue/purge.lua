-- Cancels every job that is not leased. ARGV: name, a random number (for the expiries run
-- first). Returns how many.
if not load_meta() then
  return no_queue()
end
local now = now_ms()
tick(now, tonumber(ARGV[2]))
local n = 0
for _, s in ipairs(redis.call('ZRANGE', K_LIVE, 0, -1)) do
  local seq = tonumber(s)
  -- Cancelling the front of an ordering key activates the next one, which is a victim
  -- too: its state is read when its turn comes.
  if redis.call('ZSCORE', K_LIVE, s) and jget(seq, 'state') ~= 'leased' then
    unplace(seq)
    -- No lease finishes it (see cancel.lua).
    redis.call('HDEL', job_key(seq), 'nonce', 'consumer')
    mincr('cancelled', 1)
    finish(seq, now, 'cancelled', nil)
    n = n + 1
  end
end
return n
