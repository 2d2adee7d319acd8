-- Writes a schedule's definition and progress, compare-and-set on its revision.
-- ARGV: queue name, schedule name, expected revision ('' : the schedule must not exist),
-- then field/value pairs for the schedule's hash. Returns 1, or 0 when the schedule's
-- revision is not the expected one (or it exists when it should not).
local SK = B .. ':sched:' .. ARGV[2]
local rev = redis.call('HGET', SK, 'rev')
if ARGV[3] == '' then
  if rev then
    return 0
  end
elseif rev ~= ARGV[3] then
  return 0
end
local fields = {}
for i = 4, #ARGV do
  fields[#fields + 1] = ARGV[i]
end
redis.call('HSET', SK, unpack(fields))
return 1
