#!lua flags=allow-oom
-- Nack: dead-letter messages the caller holds. Core command: Nack (batched, one
-- reason per call). The payload moves to the canonical queue's dead letters
-- (exactly the bytes that were stored: Dramatiq reads them) before it leaves the
-- queue's hash, in one step. The reason, when it is not a plain nack, is kept in
-- dq's own hash ns:__dq__.reasons.C (Dramatiq never reads it). It moves what is
-- stored rather than adding to it, so it runs at maxmemory too.
--
-- KEYS[1] ns:__acks__.W.Q   KEYS[2] ns:Q.msgs   KEYS[3] ns:C.XQ (zset)
-- KEYS[4] ns:C.XQ.msgs      KEYS[5] ns:__dq__.deliveries.Q   KEYS[6] ns:__dq__.started.Q
-- KEYS[7] ns:__dq__.reasons.C
-- ARGV[1] now (ms)   ARGV[2] reason ('' for a plain nack)   ARGV[3..] ids
local counted = redis.call('TYPE', KEYS[5]).ok == 'hash'
local marked = redis.call('TYPE', KEYS[6]).ok == 'hash'
local reason = ARGV[2]
if reason ~= '' then
  local kind = redis.call('TYPE', KEYS[7]).ok
  if kind ~= 'hash' and kind ~= 'none' then
    reason = ''
  end
end
local nacked = 0
for i = 3, #ARGV do
  local id = ARGV[i]
  local payload = redis.call('HGET', KEYS[2], id)
  if payload and redis.call('SISMEMBER', KEYS[1], id) == 1 then
    -- Stored as a dead letter first, then forgotten: an error part-way leaves
    -- the message held (it comes back), never nowhere.
    redis.call('ZADD', KEYS[3], ARGV[1], id)
    redis.call('HSET', KEYS[4], id, payload)
    if reason ~= '' then
      redis.call('HSET', KEYS[7], id, reason)
    end
    redis.call('HDEL', KEYS[2], id)
    nacked = nacked + 1
  end
  if redis.call('SREM', KEYS[1], id) == 1 then
    if counted then
      redis.call('HDEL', KEYS[5], id)
    end
    if marked then
      redis.call('HDEL', KEYS[6], id)
    end
  end
end
return nacked
