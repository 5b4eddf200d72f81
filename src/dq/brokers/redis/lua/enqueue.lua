#!lua
-- Enqueue: store messages on one queue (or delay queue) and wake its consumers.
-- Core command: Enqueue (one or many). Atomic: every message is in the hash before
-- its id is in the list, and all of them or none are stored. Without allow-oom, a
-- server at maxmemory refuses the whole call before it runs (nothing is stored).
--
-- KEYS[1] ns:Q (list)   KEYS[2] ns:Q.msgs (hash)
-- ARGV[1] notification channel, then ARGV[2..] = id1, payload1, id2, payload2, ...
local chunk = 500
local ids, pairs_ = {}, {}
for i = 2, #ARGV, 2 do
  ids[#ids + 1] = ARGV[i]
  pairs_[#pairs_ + 1] = ARGV[i]
  pairs_[#pairs_ + 1] = ARGV[i + 1]
  if #ids == chunk then
    redis.call('HSET', KEYS[2], unpack(pairs_))
    redis.call('RPUSH', KEYS[1], unpack(ids))
    ids, pairs_ = {}, {}
  end
end
if #ids > 0 then
  redis.call('HSET', KEYS[2], unpack(pairs_))
  redis.call('RPUSH', KEYS[1], unpack(ids))
end
redis.call('PUBLISH', ARGV[1], '')
return (#ARGV - 1) / 2
