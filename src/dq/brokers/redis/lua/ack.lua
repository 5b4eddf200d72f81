-- Ack: forget messages the caller processed. Core transition: Ack (batched).
-- An id the caller no longer holds (recovered by another worker, requeued) is
-- left alone: that copy will run again (at-least-once).
--
-- KEYS[1] ns:__acks__.W.Q   KEYS[2] ns:Q.msgs
-- KEYS[3] ns:__dq__.deliveries.Q   KEYS[4] ns:__dq__.started.Q
-- ARGV = ids
local acked = 0
local counted = redis.call('EXISTS', KEYS[3]) == 1
for i = 1, #ARGV do
  if redis.call('SREM', KEYS[1], ARGV[i]) == 1 then
    redis.call('HDEL', KEYS[2], ARGV[i])
    if counted then
      redis.call('HDEL', KEYS[3], ARGV[i])
      redis.call('HDEL', KEYS[4], ARGV[i])
    end
    acked = acked + 1
  end
end
return acked
