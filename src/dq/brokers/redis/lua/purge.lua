-- Purge: drop the waiting messages of one queue (or delay queue) and the dead
-- letters of its canonical queue. Core transition: Flush. Messages reserved by
-- consumers keep their payload (they stay with their consumers, as in the core).
--
-- KEYS[1] ns:Q   KEYS[2] ns:Q.msgs   KEYS[3] ns:C.XQ   KEYS[4] ns:C.XQ.msgs
-- Returns how many waiting messages were dropped.
local dropped = 0
while true do
  local ids = redis.call('LPOP', KEYS[1], 500)
  if not ids then
    break
  end
  redis.call('HDEL', KEYS[2], unpack(ids))
  dropped = dropped + #ids
end
redis.call('DEL', KEYS[3], KEYS[4])
return dropped
