-- Deletes a target's schema: no revision is current, the history stays. KEYS[1]: the
-- target's schema hash (see set.lua). Returns the revision that was current (0: none).
local cur = tonumber(redis.call('HGET', KEYS[1], 'cur') or '0')
if cur > 0 then
  redis.call('HSET', KEYS[1], 'cur', 0)
end
return cur
