-- Step 1 of a redrive (see queue/redrive.rs): takes jobs out of this dead-letter queue
-- and parks them in flight. ARGV: name, most jobs, a node-made nonce, how long (ms) the
-- caller owns the parked jobs, the number of allowed origins, the allowed origins, then
-- the job ids (none: the oldest movable jobs, up to `most`). A job is movable while it is live, not leased, and has a recorded origin
-- that is allowed. A parked job leaves every index of the queue (ready, timers, live,
-- ids, its ordering key) and its hash is renamed `:rd:<seq>`, with the token of this
-- move (`<name>/<seq>/<nonce>`) as `rdtoken`, and its seq goes into the `:rdbox` zset
-- scored by the end of the caller's ownership: no consumer, listing or cancel sees it,
-- and once the ownership ends another redrive may claim it (redrive_claim.lua) and
-- finish the move. Returns {{seq, fields}...}, {skipped ids...}.
if not load_meta() then
  return no_queue()
end
local now = now_ms()
local most, nonce, own = tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local nallowed = tonumber(ARGV[5])
local allowed = {}
for i = 6, 5 + nallowed do
  allowed[ARGV[i]] = true
end
local first_id = 6 + nallowed
local K_RDBOX = B .. ':rdbox'

local function movable(seq)
  if not redis.call('ZSCORE', K_LIVE, I(seq)) then
    return false
  end
  local f = redis.call('HMGET', job_key(seq), 'state', 'origin')
  return f[1] ~= 'leased' and f[2] and allowed[f[2]] or false
end

local function take(seq)
  local s = I(seq)
  local k = job_key(seq)
  unplace(seq)
  if redis.call('HDEL', k, 'blocked') == 1 then
    mincr('blocked', -1)
  end
  redis.call('ZREM', K_LIVE, s)
  local okey = redis.call('HGET', k, 'okey')
  if okey then
    release_ordering_key(okey, seq, now)
  end
  local id = redis.call('HGET', k, 'id')
  if redis.call('HGET', K_IDS, id) == s then
    redis.call('HDEL', K_IDS, id)
  end
  local rk = B .. ':rd:' .. s
  redis.call('HSET', k, 'rdtoken', NAME .. '/' .. s .. '/' .. nonce)
  redis.call('RENAME', k, rk)
  redis.call('ZADD', K_RDBOX, after(now, own), s)
  return { seq, redis.call('HGETALL', rk) }
end

local out, skipped = {}, {}
if #ARGV >= first_id then
  for i = first_id, #ARGV do
    local seq = redis.call('HGET', K_IDS, ARGV[i])
    -- An id given twice is moved once: the second finds no job (its id left `:ids`).
    if seq and movable(tonumber(seq)) then
      out[#out + 1] = take(tonumber(seq))
    else
      skipped[#skipped + 1] = ARGV[i]
    end
  end
else
  local seqs, after = {}, '-inf'
  while #seqs < most do
    local page = redis.call('ZRANGEBYSCORE', K_LIVE, after, '+inf', 'LIMIT', 0, 500)
    if #page == 0 then
      break
    end
    for _, s in ipairs(page) do
      if movable(tonumber(s)) then
        seqs[#seqs + 1] = tonumber(s)
        if #seqs >= most then
          break
        end
      end
    end
    after = '(' .. page[#page]
  end
  for _, seq in ipairs(seqs) do
    out[#out + 1] = take(seq)
  end
end
wake()
return { out, skipped }
