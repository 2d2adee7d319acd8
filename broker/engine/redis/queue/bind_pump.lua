-- Enqueues messages of a bound topic as jobs and moves the binding's cursor past them,
-- only if the cursor is still what the caller read (so each message becomes a job once,
-- whatever nodes pump at the same time). ARGV: name, topic, the cursor read ('' for
-- none), the topic's epoch, the cursor after the last message given, how many messages
-- retention dropped before they were pumped, the number of messages, then per message:
-- its sequence, a job id, payload, encoded headers. Jobs are as the in-process binding
-- makes them: kind = the topic, priority 0, the queue's max attempts, no idempotency or
-- ordering key. Only as many as fit under max depth are taken; the cursor then stops at
-- the first one left. Returns {taken, 1 if some were left for want of room else 0}, or
-- {-1, 0} when the cursor moved since it was read.
if not load_meta() then
  return no_queue()
end
local K_BIND = B .. ':bind'
local topic = ARGV[2]
local field = 'c:' .. topic
if (redis.call('HGET', K_BIND, field) or '') ~= ARGV[3] then
  return { -1, 0 }
end
local now = now_ms()
local n = tonumber(ARGV[7])
local room = math.max(0, mnum('max_depth') - redis.call('ZCARD', K_LIVE))
local take = math.min(n, room)
local attempts = math.min(math.max(mnum('max_attempts'), 1), 10000)
for j = 0, take - 1 do
  local b = 8 + j * 4
  local id = ARGV[b + 1]
  local seq = redis.call('HINCRBY', K_META, 'seq', 1)
  redis.call('HSET', job_key(seq), 'id', id, 'kind', topic, 'payload', ARGV[b + 2],
    'headers', ARGV[b + 3], 'prio', 0, 'attempts', 0, 'max_att', I(attempts),
    'state', 'pending', 'enq_at', I(now), 'run_at', I(now), 'upd_at', I(now))
  redis.call('HSET', K_IDS, id, I(seq))
  redis.call('ZADD', K_LIVE, seq, I(seq))
  place(seq, now)
end
local next = ARGV[5]
if take < n then
  next = ARGV[8 + take * 4]
end
redis.call('HSET', K_BIND, field, ARGV[4] .. '/' .. next)
local trimmed = tonumber(ARGV[6])
if trimmed > 0 then
  redis.call('HINCRBY', K_BIND, 'trimmed', trimmed)
end
mincr('enqueued', take)
wake()
if take < n then
  return { take, 1 }
end
return { take, 0 }
