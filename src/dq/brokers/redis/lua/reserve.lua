#!lua flags=allow-oom
-- Reserve: hand up to n messages to one consumer. Core command: Reserve.
-- Each id popped from the list joins the caller's ack set in the same step. An id
-- whose payload is missing is dropped from the ack set at once instead of staying
-- there forever. It moves ids from the list to the ack set (nothing grows), so it
-- runs at maxmemory too: a full Redis can still be drained.
--
-- The caller's heartbeat is refreshed after the move, and only when something was
-- reserved (whoever creates an ack set is alive at that moment: forget.lua relies
-- on it). It is a pcall: a heartbeat that cannot be written never blocks a fetch
-- (the keeper's heartbeat.lua writes it on its timer anyway).
--
-- KEYS[1] ns:Q   KEYS[2] ns:Q.msgs   KEYS[3] ns:__acks__.W.Q   KEYS[4] ns:__heartbeats__
-- KEYS[5] ns:__dq__.deliveries.Q
-- ARGV[1] n (at most the unpack limit)   ARGV[2] now (ms)   ARGV[3] worker id W
-- Returns a flat array id1, payload1, suspect1, id2, ... in FIFO order, where
-- suspect is 1 when a consumer died holding the message before (it has a delivery
-- count: the worker runs it alone and reports its start), else 0.
-- Keys of the wrong type (written by somebody else) are named in an error before
-- anything moves, so nothing popped is ever left nowhere.
local expected = {'list', 'hash', 'set'}
for i = 1, 3 do
  local kind = redis.call('TYPE', KEYS[i]).ok
  if kind ~= expected[i] and kind ~= 'none' then
    return redis.error_reply('WRONGTYPE ' .. KEYS[i] .. ' is a ' .. kind .. ', not a ' .. expected[i])
  end
end
local ids = redis.call('LPOP', KEYS[1], ARGV[1])
if not ids then
  return {}
end
redis.call('SADD', KEYS[3], unpack(ids))
redis.pcall('ZADD', KEYS[4], ARGV[2], ARGV[3])
local payloads = redis.call('HMGET', KEYS[2], unpack(ids))
local counted = redis.call('TYPE', KEYS[5]).ok == 'hash'
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
