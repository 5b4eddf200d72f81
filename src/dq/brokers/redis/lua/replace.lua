-- Replace: store a new message and forget the held one it replaces, in one step.
-- Core transitions: Promote (a due delayed message becomes a ready copy on its
-- canonical queue) and a retry (the failed message is acked and its retry stored
-- on the delay queue). If the caller no longer holds the old id (another worker
-- recovered it), nothing is stored: the old copy runs again instead, so the
-- message is never duplicated by this step.
--
-- KEYS[1] ns:__acks__.W.Qold   KEYS[2] ns:Qold.msgs   KEYS[3] ns:__dq__.deliveries.Qold
-- KEYS[4] ns:__dq__.started.Qold   KEYS[5] ns:Qnew   KEYS[6] ns:Qnew.msgs
-- ARGV[1] old id   ARGV[2] new id   ARGV[3] new payload   ARGV[4] channel of Qnew
-- Returns 1 when replaced, 0 when the caller did not hold the old id.
if redis.call('SREM', KEYS[1], ARGV[1]) == 0 then
  return 0
end
redis.call('HSET', KEYS[6], ARGV[2], ARGV[3])
redis.call('RPUSH', KEYS[5], ARGV[2])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('HDEL', KEYS[4], ARGV[1])
redis.call('PUBLISH', ARGV[4], '')
return 1
