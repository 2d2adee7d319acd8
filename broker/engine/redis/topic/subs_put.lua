-- Publishes one node's count of the open subscriptions that follow this topic (see
-- topic/subscribers.rs). ARGV: node id, count, version, stale ms. Each field of `:subs`
-- is a node id, its value "<count> <written at, Redis ms> <version>". A write whose
-- version is not above the stored one is dropped, so a node's racing writes may arrive
-- in any order; fields of other nodes not written for `stale` ms are dropped (a node that
-- stopped without closing its subscriptions). Nothing is written for a topic that does
-- not exist. Returns 1 if written.
if redis.call('EXISTS', meta) == 0 then
  return 0
end
local subs = base .. ':subs'
local node, count, version = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local stale = tonumber(ARGV[4])
local now = now_ms()
local all = redis.call('HGETALL', subs)
for i = 1, #all, 2 do
  local _, at, v = string.match(all[i + 1], '^(%d+) (%d+) (%d+)$')
  if all[i] == node then
    if v and tonumber(v) >= version then
      return 0
    end
  elseif not at or tonumber(at) + stale <= now then
    redis.call('HDEL', subs, all[i])
  end
end
redis.call('HSET', subs, node, num(count) .. ' ' .. num(now) .. ' ' .. num(version))
return 1
