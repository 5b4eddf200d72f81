#!lua flags=allow-oom
-- Requeue: return unprocessed messages the caller holds to the tail of their
-- queue. Core commands: Requeue, and Release (a closing consumer returns all it
-- holds in one call). It moves ids from the ack set to the list (nothing grows),
-- so it runs at maxmemory too. Each id is pushed before it leaves the ack set.
--
-- KEYS[1] ns:__acks__.W.Q   KEYS[2] ns:Q.msgs   KEYS[3] ns:Q
-- ARGV[1] notification channel, ARGV[2..] ids
local requeued = 0
for i = 2, #ARGV do
  local id = ARGV[i]
  if redis.call('SISMEMBER', KEYS[1], id) == 1 then
    if redis.call('HEXISTS', KEYS[2], id) == 1 then
      redis.call('RPUSH', KEYS[3], id)
      requeued = requeued + 1
    end
    redis.call('SREM', KEYS[1], id)
  end
end
if requeued > 0 then
  redis.call('PUBLISH', ARGV[1], '')
end
return requeued
