-- Counts a gap notice a subscription sent (field `gaps` of the meta hash), unless the
-- topic is gone (an HINCRBY alone would bring back a meta hash without a topic).
if redis.call('EXISTS', meta) == 0 then
  return 0
end
redis.call('HINCRBY', meta, 'gaps', 1)
return 1
