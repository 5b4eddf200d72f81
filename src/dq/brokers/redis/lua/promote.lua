#!lua flags=allow-oom
-- Promote: store a due delayed message as a ready copy on its canonical queue (a
-- new id, no eta) and forget the held delayed one, in one step. Core command:
-- Promote. If the caller no longer holds the old id (another worker recovered it),
-- nothing is stored: the delayed copy is promoted again later, never twice. It
-- rewrites what is stored (same payload, new id), so it runs at maxmemory too.
--
-- KEYS[1] ns:__acks__.W.Qold   KEYS[2] ns:Qold.msgs   KEYS[3] ns:__dq__.deliveries.Qold
-- KEYS[4] ns:__dq__.started.Qold   KEYS[5] ns:Qnew   KEYS[6] ns:Qnew.msgs
-- ARGV[1] old id   ARGV[2] new id   ARGV[3] new payload   ARGV[4] channel of Qnew
-- Returns 1 when replaced, 0 when the caller did not hold the old id.
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 0 then
  return 0
end
-- Stored first, then the delayed copy forgotten: an error part-way leaves it held.
redis.call('HSET', KEYS[6], ARGV[2], ARGV[3])
redis.call('RPUSH', KEYS[5], ARGV[2])
redis.call('SREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
if redis.call('TYPE', KEYS[3]).ok == 'hash' then
  redis.call('HDEL', KEYS[3], ARGV[1])
end
if redis.call('TYPE', KEYS[4]).ok == 'hash' then
  redis.call('HDEL', KEYS[4], ARGV[1])
end
redis.call('PUBLISH', ARGV[4], '')
return 1
