#!lua flags=allow-oom
-- Flush: drop the waiting messages of one queue (or delay queue) and the dead
-- letters of its canonical queue (with their reasons). Core command: Flush.
-- Messages reserved by consumers keep their payload (they stay with their
-- consumers, as in the core). It only frees memory, so it runs at maxmemory too.
--
-- The delivery counts and run marks of the dropped messages go with them (the
-- core's Flush drops their counts too).
--
-- KEYS[1] ns:Q   KEYS[2] ns:Q.msgs   KEYS[3] ns:C.XQ   KEYS[4] ns:C.XQ.msgs
-- KEYS[5] ns:__dq__.reasons.C   KEYS[6] ns:__dq__.deliveries.Q   KEYS[7] ns:__dq__.started.Q
-- Returns how many waiting messages were dropped.
local dropped = 0
local counted = redis.call('EXISTS', KEYS[6]) == 1 or redis.call('EXISTS', KEYS[7]) == 1
while true do
  local ids = redis.call('LPOP', KEYS[1], 500)
  if not ids then
    break
  end
  redis.call('HDEL', KEYS[2], unpack(ids))
  if counted then
    redis.call('HDEL', KEYS[6], unpack(ids))
    redis.call('HDEL', KEYS[7], unpack(ids))
  end
  dropped = dropped + #ids
end
redis.call('DEL', KEYS[3], KEYS[4], KEYS[5])
return dropped
