-- Forget a dead worker: drop its heartbeat once its ack sets were recovered.
-- The caller found and recovered every ns:__acks__.D.* key first. Any process that
-- creates an ack set refreshes its heartbeat in the same step (dq's fetch and every
-- Dramatiq dispatch do), so if D's heartbeat is still at or below the cutoff, D made
-- no ack set since, and removing it orphans nothing.
--
-- KEYS[1] ns:__heartbeats__   ARGV[1] D   ARGV[2] cutoff (ms)
local beat = redis.call('ZSCORE', KEYS[1], ARGV[1])
if beat and tonumber(beat) <= tonumber(ARGV[2]) then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return 1
end
return 0
