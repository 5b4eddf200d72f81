#!lua flags=allow-oom
-- Heartbeat: record that worker W is alive at now (ms). Not a core command: what
-- the core's Recover reads (`dq.core.policy.dead_consumers`). It rewrites one
-- entry, so it runs at maxmemory too: a live worker must never look dead because
-- Redis is full.
--
-- KEYS[1] ns:__heartbeats__   ARGV[1] now (ms)   ARGV[2] W
return redis.call('ZADD', KEYS[1], ARGV[1], ARGV[2])
