-- Fetch: reserve up to n messages for one consumer. Core transition: Reserve.
-- Each id popped from the list joins the caller's ack set in the same step, and
-- the caller's heartbeat is refreshed (whoever creates an ack set is alive at
-- that moment: recovery relies on it). An id whose payload is missing is dropped
-- from the ack set at once instead of staying there forever.
--
-- KEYS[1] ns:Q   KEYS[2] ns:Q.msgs   KEYS[3] ns:__acks__.W.Q   KEYS[4] ns:__heartbeats__
-- KEYS[5] ns:__dq__.deliveries.Q
-- ARGV[1] n (at most the unpack limit)   ARGV[2] now (ms)   ARGV[3] worker id W
-- Returns a flat array id1, payload1, suspect1, id2, ... in FIFO order, where
-- suspect is 1 for a message recovered from a dead worker before (the consumer
-- then records when it starts running it), else 0.
redis.call('ZADD', KEYS[4], ARGV[2], ARGV[3])
local ids = redis.call('LPOP', KEYS[1], ARGV[1])
if not ids then
  return {}
end
redis.call('SADD', KEYS[3], unpack(ids))
local payloads = redis.call('HMGET', KEYS[2], unpack(ids))
local counted = redis.call('EXISTS', KEYS[5]) == 1
local out = {}
for i = 1, #ids do
  local payload = payloads[i]
  if payload then
    out[#out + 1] = ids[i]
    out[#out + 1] = payload
    if counted and redis.call('HEXISTS', KEYS[5], ids[i]) == 1 then
      out[#out + 1] = 1
    else
      out[#out + 1] = 0
    end
  else
    redis.call('SREM', KEYS[3], ids[i])
  end
end
return out
