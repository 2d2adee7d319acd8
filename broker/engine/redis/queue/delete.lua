-- Deletes a queue and every key it has. ARGV: name. One script, so a big queue blocks
-- Redis while it goes (as a big DEL would).
if not load_meta() then
  return no_queue()
end
for _, s in ipairs(redis.call('HVALS', K_IDS)) do
  local k = B .. ':job:' .. s
  local okey = redis.call('HGET', k, 'okey')
  if okey then
    redis.call('DEL', ord_key(okey))
  end
  redis.call('DEL', k)
end
for _, s in ipairs(redis.call('LRANGE', K_OUTBOX, 0, -1)) do
  redis.call('DEL', B .. ':dl:' .. s)
end
-- Jobs a redrive parked in flight (queue/redrive.rs), and the redrive tokens and topic
-- binding cursors (queue/binding.rs) this queue keeps.
for _, s in ipairs(redis.call('ZRANGE', B .. ':rdbox', 0, -1)) do
  redis.call('DEL', B .. ':rd:' .. s)
end
redis.call('DEL', B .. ':rdbox', B .. ':rdseen', B .. ':bind')
redis.call('DEL', K_META, K_READY, K_TIMERS, K_LEASED, K_LIVE, K_IDS, K_IDEM, K_IDEMEXP,
  K_HISTORY, K_OUTBOX, K_CONSUMERS, K_RATES, K_WAITING)
return 1
