-- Applies retention (age evicts messages without any publish). Returns 1 if the topic
-- exists, 0 if not.
if redis.call('EXISTS', meta) == 0 then
  return 0
end
enforce(meta, log, now_ms())
return 1
