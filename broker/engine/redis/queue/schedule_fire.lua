-- Applies one schedule decision atomically, in the schedule's queue's slot: the tick's
-- job (enqueue.lua's logic, `enqueue_job` above) and the schedule's new progress, or
-- nothing. This is what makes a tick fire once across nodes: the decision applies only if
-- the schedule is still at the revision the node planned from, and never to a tick at or
-- before the last fire.
-- ARGV: queue name, 1, the job's 9 enqueue fields and the schema revision (see
-- enqueue.lua), then schedule name,
-- expected revision, decision ('fire', 'skip_missed', 'skip_overlap' or 'advance'), tick,
-- next tick ('' for none), overlap skip ('1' or '0').
-- Returns {outcome, job id}: outcome is the decision applied ('fire' may become
-- 'skip_overlap' when the previous job still runs), or 'stale' / 'gone'.
local SK = B .. ':sched:' .. ARGV[13]
local rev = redis.call('HGET', SK, 'rev')
if not rev then
  return { 'gone', '' }
end
if rev ~= ARGV[14] then
  return { 'stale', '' }
end
local decision, tick, next_tick = ARGV[15], ARGV[16], ARGV[17]
local last = redis.call('HGET', SK, 'last_fire')
if decision ~= 'advance' and last and last ~= '' and tonumber(last) >= tonumber(tick) then
  decision = 'advance'
end
if decision == 'fire' and ARGV[18] == '1' then
  local lj = redis.call('HGET', SK, 'last_job')
  if lj and lj ~= '' then
    local seq = redis.call('HGET', K_IDS, lj)
    if seq then
      local st = jget(tonumber(seq), 'state')
      if st == 'pending' or st == 'scheduled' or st == 'leased' or st == 'retrying' then
        decision = 'skip_overlap'
      end
    end
  end
end
local job_id = ''
if decision == 'fire' then
  local r = enqueue_job()
  if r.err then
    return r
  end
  job_id = r[1][1]
  redis.call('HINCRBY', SK, 'fired', 1)
  redis.call('HSET', SK, 'last_job', job_id)
elseif decision == 'skip_missed' then
  redis.call('HINCRBY', SK, 'skipped_missed', 1)
elseif decision == 'skip_overlap' then
  redis.call('HINCRBY', SK, 'skipped_overlap', 1)
end
if decision ~= 'advance' then
  redis.call('HSET', SK, 'last_fire', tick)
end
redis.call('HSET', SK, 'next_fire', next_tick)
redis.call('HINCRBY', SK, 'rev', 1)
return { decision, job_id }
