-- Deletes a topic and its log; wakes its subscribers so they drop it. Its idempotency
-- keys belong to the deleted incarnation (epoch) and expire by themselves.
-- Returns 1 if it existed, 0 if not.
if redis.call('EXISTS', meta) == 0 then
  return 0
end
-- The nodes' subscriber counts and the publish rate go too: a topic created again is
-- counted afresh.
redis.call('DEL', meta, log, base .. ':subs', rates)
redis.call('SPUBLISH', base .. ':wake', '1')
return 1
