-- Reads up to ARGV[2] messages from sequence ARGV[1] (or from the oldest retained one).
-- Returns nil if the topic does not exist, else {first, next, epoch, entries} where
-- entries are XRANGE's [id, fields] pairs.
local m = redis.call('HMGET', meta, 'first', 'next', 'epoch')
if not m[1] then
  return false
end
local first, next = tonumber(m[1]), tonumber(m[2])
local from = math.max(tonumber(ARGV[1]), first)
local entries = {}
if from < next and tonumber(ARGV[2]) > 0 then
  entries = redis.call('XRANGE', log, num(from) .. '-1', '+', 'COUNT', ARGV[2])
end
return { m[1], m[2], m[3], entries }
