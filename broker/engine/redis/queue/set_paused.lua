-- Pauses or resumes leasing. ARGV: name, '1'/'0'.
if not load_meta() then
  return no_queue()
end
redis.call('HSET', K_META, 'paused', ARGV[2])
named_by_producer()
if ARGV[2] == '0' then
  WOKE = 1
  wake()
end
return 1
