-- Notes that a waiter is about to wait for visible jobs of this queue. ARGV: name, the
-- waiter's token (made by its node), how long the note lasts in ms (Redis's clock). The
-- scripts that make jobs visible publish a wake-up only while some note lasts (`wake`),
-- so a busy queue whose workers never wait publishes nothing. A waiter notes itself,
-- then looks once more before it waits (a job made visible before the note is found by
-- that look), and notes itself again before the note runs out. Expired notes go here;
-- the key itself expires with the last note (a deleted queue keeps none).
local now = now_ms()
local ttl = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', K_WAITING, '-inf', now)
redis.call('ZADD', K_WAITING, after(now, ttl), ARGV[2])
redis.call('PEXPIRE', K_WAITING, ttl)
return 1
