-- The queues a redrive of this dead-letter queue would move jobs into (nothing moves).
-- ARGV: name, most jobs (when no ids are given), then the job ids (none: the oldest
-- movable jobs). A job is movable while it is live, not leased, and has the origin the
-- broker recorded when it dead-lettered it. Returns the distinct origins.
if not load_meta() then
  return no_queue()
end
local most = tonumber(ARGV[2])

-- The origin of live job `seq` if a redrive may move it, else false.
local function movable(seq)
  if not redis.call('ZSCORE', K_LIVE, I(seq)) then
    return false
  end
  local f = redis.call('HMGET', job_key(seq), 'state', 'origin')
  if f[1] == 'leased' then
    return false
  end
  return f[2]
end

local seen, out = {}, {}
local function add(origin)
  if origin and not seen[origin] then
    seen[origin] = true
    out[#out + 1] = origin
  end
end

if #ARGV > 2 then
  for i = 3, #ARGV do
    local seq = redis.call('HGET', K_IDS, ARGV[i])
    if seq then
      add(movable(tonumber(seq)))
    end
  end
  return out
end
local taken, after = 0, '-inf'
while taken < most do
  local page = redis.call('ZRANGEBYSCORE', K_LIVE, after, '+inf', 'LIMIT', 0, 500)
  if #page == 0 then
    break
  end
  for _, s in ipairs(page) do
    local origin = movable(tonumber(s))
    if origin then
      add(origin)
      taken = taken + 1
      if taken >= most then
        break
      end
    end
  end
  after = '(' .. page[#page]
end
return out
