-- Step 3 of a redrive: forgets parked jobs that reached their origin. ARGV: name, then
-- their seqs. Returns how many were still parked (a repeat finds none).
local n = 0
for i = 2, #ARGV do
  n = n + redis.call('ZREM', B .. ':rdbox', ARGV[i])
  redis.call('DEL', B .. ':rd:' .. ARGV[i])
end
return n
