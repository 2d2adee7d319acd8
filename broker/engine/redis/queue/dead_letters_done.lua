-- Drops dead letters that reached their dead-letter queue. ARGV: name, then their seqs.
local n = 0
for i = 2, #ARGV do
  n = n + redis.call('LREM', K_OUTBOX, 1, ARGV[i])
  redis.call('DEL', B .. ':dl:' .. ARGV[i])
end
return n
