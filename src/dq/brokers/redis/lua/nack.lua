-- Nack: dead-letter messages the caller holds. Core transition: Nack (batched).
-- The payload moves to the canonical queue's dead letters (exactly the bytes that
-- were stored) before it leaves the queue's hash, in one step.
--
-- KEYS[1] ns:__acks__.W.Q   KEYS[2] ns:Q.msgs   KEYS[3] ns:C.XQ (zset)
-- KEYS[4] ns:C.XQ.msgs      KEYS[5] ns:__dq__.deliveries.Q   KEYS[6] ns:__dq__.started.Q
-- ARGV[1] now (ms), ARGV[2..] ids
local nacked = 0
for i = 2, #ARGV do
  local id = ARGV[i]
  if redis.call('SREM', KEYS[1], id) == 1 then
    local payload = redis.call('HGET', KEYS[2], id)
    if payload then
      redis.call('ZADD', KEYS[3], ARGV[1], id)
      redis.call('HSET', KEYS[4], id, payload)
      redis.call('HDEL', KEYS[2], id)
      nacked = nacked + 1
    end
    redis.call('HDEL', KEYS[5], id)
    redis.call('HDEL', KEYS[6], id)
  end
end
return nacked
