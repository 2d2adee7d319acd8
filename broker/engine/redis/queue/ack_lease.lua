-- Acks then leases in one call (see `QueueStore::ack_lease`): ack.lua, then lease.lua
-- (`ack_part` and `lease_part`, library.rs's glue). ARGV: name, the ack's count and
-- triples as ack.lua takes them, then lease.lua's arguments after its name. Returns
-- {ack.lua's reply, lease.lua's reply}; an unknown queue is an error, as for a lease.
-- The meta hash is read once for both parts (`KEEP_META`), and consumer records are read
-- once and written once (`UNWRITTEN`).
if not load_meta(META_ACK_LEASE) then
  return no_queue()
end
KEEP_META = true
local count = tonumber(ARGV[2])
local acks = { ARGV[1], ARGV[2] }
for i = 3, 2 + count * 3 do
  acks[#acks + 1] = ARGV[i]
end
local lease = { ARGV[1] }
for i = 3 + count * 3, #ARGV do
  lease[#lease + 1] = ARGV[i]
end
-- The worker's record, changed by both parts, is written once.
UNWRITTEN = {}
local acked = ack_part(acks)
local leased = lease_part(lease)
consumer_flush()
return { acked, leased }
