-- Pauses or resumes leasing. ARGV: name, '1'/'0'. A pause is announced on the queue's
-- pause channel, so consume streams give back the jobs they leased ahead (consume.rs).
if not load_meta() then
  return no_queue()
end
redis.call('HSET', K_META, 'paused', ARGV[2])
named_by_producer()
if ARGV[2] == '1' then
  redis.call('SPUBLISH', K_PAUSE, '1')
end
if ARGV[2] == '0' then
  -- Whatever is visible now can be leased: wake waiters if there is any.
  WOKE, READY_UNSURE = 1, true
  wake()
end
return 1
