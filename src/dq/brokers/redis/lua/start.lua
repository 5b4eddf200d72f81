#!lua flags=allow-oom
-- Start: record that a suspect message (one a consumer died holding before)
-- starts running, and whether alone. Core command: Start. Only suspects are
-- marked (the consumer sends nothing for other messages). Recovery reads the
-- mark: a death while it ran alone counts one more delivery. Guarded: a message
-- the caller no longer holds is not marked. One small field, so it runs at
-- maxmemory too (a mark lost there would let a poison message loop).
--
-- KEYS[1] ns:__acks__.W.Q   KEYS[2] ns:__dq__.started.Q
-- ARGV[1] id   ARGV[2] mark (W when it runs alone, 'W shared' beside others)
-- Returns 1 when marked.
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 0 then
  return 0
end
local kind = redis.call('TYPE', KEYS[2]).ok
if kind ~= 'hash' and kind ~= 'none' then
  return 0
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return 1
