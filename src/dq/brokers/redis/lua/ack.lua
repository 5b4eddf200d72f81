#!lua flags=allow-oom
-- Ack: forget messages the caller processed. Core commands: Ack and AckMany (one
-- script settles a batch). It only frees memory, so it runs at maxmemory too.
-- An id the caller no longer holds (recovered by another worker, requeued) is
-- left alone: that copy will run again (at-least-once).
--
-- KEYS[1] ns:__acks__.W.Q   KEYS[2] ns:Q.msgs
-- KEYS[3] ns:__dq__.deliveries.Q   KEYS[4] ns:__dq__.started.Q
-- ARGV = ids
local acked = 0
-- The delivery counters exist only while a suspect is unsettled; a key of another
-- type (somebody else's) is never touched.
local counted = redis.call('TYPE', KEYS[3]).ok == 'hash'
local marked = redis.call('TYPE', KEYS[4]).ok == 'hash'
for i = 1, #ARGV do
  if redis.call('SREM', KEYS[1], ARGV[i]) == 1 then
    redis.call('HDEL', KEYS[2], ARGV[i])
    if counted then
      redis.call('HDEL', KEYS[3], ARGV[i])
    end
    if marked then
      redis.call('HDEL', KEYS[4], ARGV[i])
    end
    acked = acked + 1
  end
end
return acked
