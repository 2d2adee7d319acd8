-- Step 4 of a redrive: drops the tokens of moves whose parked jobs left the dead-letter
-- queue (step 3 done), so no retry of step 2 can come. ARGV: name, then the tokens.
for i = 2, #ARGV do
  redis.call('ZREM', B .. ':rdseen', ARGV[i])
end
return #ARGV - 1
