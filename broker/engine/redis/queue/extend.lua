-- Moves a live lease's deadline to now + visibility. ARGV: name, seq, nonce, visibility
-- ms. Returns the new deadline.
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
local deadline = after(now, tonumber(ARGV[4]))
redis.call('ZADD', K_LEASED, deadline, I(seq))
due_by(deadline)
redis.call('HSET', job_key(seq), 'deadline', I(deadline), 'upd_at', I(now))
-- The worker holding the lease, as check_lease read it.
local name = f[6]
if name then
  local c = consumer_get(name)
  c.s = now
  consumer_put(name, c)
end
return deadline
