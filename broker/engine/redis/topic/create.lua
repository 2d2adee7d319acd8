-- Creates a topic or changes its retention, applying it at once.
-- ARGV: epoch nonce (used if created), max_messages, max_bytes, max_age_ms.
-- Returns 1 if the topic was created, 0 if it existed.
local created = ensure(meta, ARGV[1], ARGV[2], ARGV[3], ARGV[4])
redis.call('HSET', meta, 'max_messages', ARGV[2], 'max_bytes', ARGV[3], 'max_age_ms', ARGV[4])
enforce(meta, log, now_ms())
return created
