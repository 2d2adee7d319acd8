-- Leases up to `max` visible jobs, highest priority first, FIFO within a priority, within
-- the paused flag and the in-flight and rate limits; due timers and leases are handled
-- first. ARGV: name, max, visibility ms ('' for the policy's), consumer, address, a random
-- number (jitter of expiries' backoff), then `max` lease nonces (hex). Returns one array
-- per delivery: id, seq, kind, payload, headers, priority, attempt, max attempts,
-- enqueued at, deadline, ordering key ('' or '=' then the key), nonce.
if not load_meta(META_LEASE) then
  return no_queue()
end
local now = now_ms()
tick(now, tonumber(ARGV[6]))

-- Workers without a name are known by their peer address: idle ones are forgotten once
-- there are many, so the hash stays bounded by the workers that are around.
local cname = ARGV[4]
local c = CONSUMERS[cname]
if c == nil then
  local raw = redis.call('HGET', K_CONSUMERS, cname)
  if not raw and redis.call('HLEN', K_CONSUMERS) >= 1024 then
    local all = redis.call('HGETALL', K_CONSUMERS)
    for i = 1, #all, 2 do
      local idle = cjson.decode(all[i + 1])
      if idle.h == 0 and idle.s + 60000 <= now then
        redis.call('HDEL', K_CONSUMERS, all[i])
      end
    end
  end
  c = consumer_decode(raw)
  CONSUMERS[cname] = c
end
c.s = now
c.a = ARGV[5]

local out = {}
if M.paused ~= '1' then
  local max = tonumber(ARGV[2])
  local room, limit = lease_room(now)
  local allowed = max
  if room ~= nil and room < max then
    allowed = room
  end
  local vis = mnum('vis')
  if ARGV[3] ~= '' then
    vis = tonumber(ARGV[3])
  end
  local deadline = after(now, vis)
  if allowed > 0 then
    local popped = redis.call('ZPOPMIN', K_READY, allowed)
    READY_UNSURE = true
    local leased = {}
    local at = I(now)
    for i = 1, #popped, 2 do
      local seq = tonumber(popped[i])
      local nonce = ARGV[6 + #out + 1]
      local k = job_key(seq)
      local f = redis.call('HMGET', k, 'id', 'kind', 'payload', 'headers', 'prio',
        'attempts', 'max_att', 'enq_at', 'okey')
      local attempts = tonumber(f[6]) + 1
      redis.call('HSET', k, 'attempts', I(attempts), 'state', 'leased', 'nonce', nonce,
        'deadline', I(deadline), 'consumer', cname, 'upd_at', at)
      leased[#leased + 1] = I(deadline)
      leased[#leased + 1] = popped[i]
      local okey = ''
      if f[9] then
        okey = '=' .. f[9]
      end
      out[#out + 1] = { f[1], seq, f[2], f[3], f[4], tonumber(f[5]), attempts,
        tonumber(f[7]), tonumber(f[8]), deadline, okey, nonce }
    end
    if #leased > 0 then
      call_many('ZADD', K_LEASED, leased)
      due_by(deadline)
    end
    c.h = c.h + #out
  end
  if mnum('rate_ps') > 0 then
    local milli = math.max(0, bucket_milli(now) - #out * 1000)
    local at = math.max(mnum('tok_at'), now)
    redis.call('HSET', K_META, 'tok', I(milli), 'tok_at', I(at))
    M.tok, M.tok_at = I(milli), I(at)
  end
  -- A lease the limit cut short while jobs stayed visible: count the time they are held
  -- back, as `Queue::note_throttled` does. max_in_flight opens an interval that the next
  -- lease end closes (`end_lease`); the rate limit counts up to its next token, each
  -- instant once (`rl_until` is the end of what is counted already).
  if room ~= nil and #out == allowed and allowed < max and redis.call('ZCARD', K_READY) > 0 then
    if limit == 'inflight' then
      if not M.if_since then
        redis.call('HSET', K_META, 'if_since', I(now))
        M.if_since = I(now)
      end
    else
      local milli = bucket_milli(now)
      if milli < 1000 then
        local ps = mnum('rate_ps')
        local until_ms = math.max(mnum('tok_at'), now) + math.ceil((1000 - milli) / ps)
        local rl_until = mnum('rl_until')
        local from = math.max(now, rl_until)
        if until_ms > from then
          mincr('rl_ms', until_ms - from)
        end
        redis.call('HSET', K_META, 'rl_until', I(math.max(rl_until, until_ms)))
      end
    end
  end
end
consumer_put(cname, c)
wake()
return out
