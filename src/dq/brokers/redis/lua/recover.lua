#!lua flags=allow-oom
-- Recover: carry out what the core decided for messages a dead worker held on one
-- queue. Core command: Recover (`dq.core.apply` decided, in Python, each id's
-- outcome from what it read: payload, delivery count, run mark). This script only
-- moves data, and is guarded so that it is a no-op for a worker whose heartbeat came
-- back, and for any id no longer in the dead worker's ack set.
--
-- Never pop before you push: each id leaves the ack set only after it is stored
-- elsewhere, in this call, so an error part-way leaves every message reachable.
-- It moves what is stored (nothing grows), so it runs at maxmemory too.
--
-- KEYS[1] ns:__heartbeats__   KEYS[2] ns:__acks__.D.Q   KEYS[3] ns:Q   KEYS[4] ns:Q.msgs
-- KEYS[5] ns:__dq__.deliveries.Q   KEYS[6] ns:__dq__.started.Q
-- KEYS[7] ns:C.XQ   KEYS[8] ns:C.XQ.msgs   KEYS[9] ns:__dq__.reasons.C
-- ARGV[1] D   ARGV[2] cutoff (ms): D is dead if its heartbeat is at or below it
-- ARGV[3] now (ms)   ARGV[4] channel of Q
-- ARGV[5..] triples: id, outcome, value, where outcome is
--   'requeue' (value: its new delivery count, '' to leave the count alone),
--   'dead'    (value: the reason kept for the dead letter), or
--   'drop'    (its payload is gone: only forget it).
-- Returns {requeued, dead-lettered id...}, {-1} if D is alive after all, or an
-- error naming a key of the wrong type (then nothing was written).
local beat = redis.call('ZSCORE', KEYS[1], ARGV[1])
if beat and tonumber(beat) > tonumber(ARGV[2]) then
  return {-1}
end
local function usable(key, kind)
  local found = redis.call('TYPE', key).ok
  return found == kind or found == 'none'
end
local function refuse(key, kind)
  return redis.error_reply('WRONGTYPE ' .. key .. ' is a ' .. redis.call('TYPE', key).ok ..
    ', not a ' .. kind)
end
local counts, deaths = false, false
for i = 5, #ARGV, 3 do
  if ARGV[i + 1] == 'requeue' and ARGV[i + 2] ~= '' then
    counts = true
  elseif ARGV[i + 1] == 'dead' then
    deaths = true
  end
end
if not usable(KEYS[2], 'set') then return refuse(KEYS[2], 'set') end
if not usable(KEYS[3], 'list') then return refuse(KEYS[3], 'list') end
if not usable(KEYS[4], 'hash') then return refuse(KEYS[4], 'hash') end
if counts and not usable(KEYS[5], 'hash') then return refuse(KEYS[5], 'hash') end
if deaths and not usable(KEYS[7], 'zset') then return refuse(KEYS[7], 'zset') end
if deaths and not usable(KEYS[8], 'hash') then return refuse(KEYS[8], 'hash') end
local counted = redis.call('TYPE', KEYS[5]).ok == 'hash'
local marked = redis.call('TYPE', KEYS[6]).ok == 'hash'
local reasons = usable(KEYS[9], 'hash')
local requeued = 0
local out = {0}
for i = 5, #ARGV, 3 do
  local id, outcome, value = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  if redis.call('SISMEMBER', KEYS[2], id) == 1 then
    local payload = redis.call('HGET', KEYS[4], id)
    if payload and outcome ~= 'dead' then
      -- (A 'drop' whose payload is back after all is requeued, never stranded.)
      -- The count is recorded first: the message is never back without it.
      if outcome == 'requeue' and value ~= '' then
        redis.call('HSET', KEYS[5], id, value)
      end
      redis.call('RPUSH', KEYS[3], id)
      requeued = requeued + 1
    elseif payload and outcome == 'dead' then
      redis.call('ZADD', KEYS[7], ARGV[3], id)
      redis.call('HSET', KEYS[8], id, payload)
      if reasons then
        redis.call('HSET', KEYS[9], id, value)
      end
      redis.call('HDEL', KEYS[4], id)
      if counted then
        redis.call('HDEL', KEYS[5], id)
      end
      out[#out + 1] = id
    elseif counted then
      -- Its payload is gone: nothing to return, only its count to forget.
      redis.call('HDEL', KEYS[5], id)
    end
    -- A run mark is spent by the death it described.
    if marked then
      redis.call('HDEL', KEYS[6], id)
    end
    redis.call('SREM', KEYS[2], id)
  end
end
if requeued > 0 then
  redis.call('PUBLISH', ARGV[4], '')
end
out[1] = requeued
return out
