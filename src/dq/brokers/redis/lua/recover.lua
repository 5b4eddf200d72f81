-- Recover: return what a dead worker held on one queue to the tail of that queue.
-- Core transition: Release, for a consumer whose process died. It keeps the rules
-- of Dramatiq's maintenance: only ids whose payload still exists are requeued, and
-- the ack set disappears only as its ids are requeued.
--
-- Poison messages (a task that kills its process): on a canonical queue, every id
-- recovered becomes a *suspect* (a field of the deliveries hash). A consumer that
-- starts running a suspect first records it in the started hash (id -> its worker
-- id). When a dead worker had started a suspect, that counts as one more delivery
-- that never settled; a message whose deliveries (the first unconfirmed crash plus
-- the counted ones) reach max_deliveries is dead-lettered instead of requeued, and
-- its id returned so the caller can log it. Messages that were only prefetched
-- beside a poison message are never counted, since they never started.
--
-- KEYS[1] ns:__heartbeats__   KEYS[2] ns:__acks__.D.Q   KEYS[3] ns:Q   KEYS[4] ns:Q.msgs
-- KEYS[5] ns:__dq__.deliveries.Q   KEYS[6] ns:__dq__.started.Q
-- KEYS[7] ns:C.XQ   KEYS[8] ns:C.XQ.msgs
-- ARGV[1] D   ARGV[2] cutoff (ms): D is dead if its heartbeat is at or below it
-- ARGV[3] max_deliveries (0: no limit, e.g. on a delay queue)   ARGV[4] now (ms)
-- ARGV[5] channel of Q
-- Returns {requeued, dead id...}, or {-1} if D is alive after all.
local beat = redis.call('ZSCORE', KEYS[1], ARGV[1])
if beat and tonumber(beat) > tonumber(ARGV[2]) then
  return {-1}
end
local limit = tonumber(ARGV[3])
local requeued = 0
local out = {0}
while true do
  local ids = redis.call('SPOP', KEYS[2], 500)
  if #ids == 0 then
    break
  end
  for _, id in ipairs(ids) do
    if redis.call('HEXISTS', KEYS[4], id) == 1 then
      local poisoned = false
      if limit > 0 then
        local counted = tonumber(redis.call('HGET', KEYS[5], id) or '0')
        if redis.call('HGET', KEYS[6], id) == ARGV[1] then
          counted = counted + 1
          redis.call('HDEL', KEYS[6], id)
        end
        if counted + 1 >= limit then
          poisoned = true
        else
          redis.call('HSET', KEYS[5], id, counted)
        end
      end
      if poisoned then
        redis.call('ZADD', KEYS[7], ARGV[4], id)
        redis.call('HSET', KEYS[8], id, redis.call('HGET', KEYS[4], id))
        redis.call('HDEL', KEYS[4], id)
        redis.call('HDEL', KEYS[5], id)
        redis.call('HDEL', KEYS[6], id)
        out[#out + 1] = id
      else
        redis.call('RPUSH', KEYS[3], id)
        requeued = requeued + 1
      end
    else
      redis.call('HDEL', KEYS[5], id)
      redis.call('HDEL', KEYS[6], id)
    end
  end
end
if requeued > 0 then
  redis.call('PUBLISH', ARGV[5], '')
end
out[1] = requeued
return out
