#!lua flags=allow-oom
-- Forget a dead worker: drop its heartbeat once every ack set it had was emptied
-- (part of Recover; the caller recovered every ns:__acks__.D.* key first and keeps
-- the heartbeat while any of them still holds something). If D's heartbeat moved
-- past the cutoff meanwhile, D is alive and nothing is removed.
--
-- KEYS[1] ns:__heartbeats__   ARGV[1] D   ARGV[2] cutoff (ms)
local beat = redis.call('ZSCORE', KEYS[1], ARGV[1])
if beat and tonumber(beat) <= tonumber(ARGV[2]) then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return 1
end
return 0
