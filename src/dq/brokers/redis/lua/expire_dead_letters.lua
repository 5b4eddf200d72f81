#!lua flags=allow-oom
-- ExpireDeadLetters: drop dead letters older than the cutoff, a batch at a time
-- (Dramatiq's maintenance does the same), with the reasons dq kept for them. It
-- only frees memory, so it runs at maxmemory too.
--
-- KEYS[1] ns:C.XQ   KEYS[2] ns:C.XQ.msgs   KEYS[3] ns:__dq__.reasons.C
-- ARGV[1] cutoff (ms)   ARGV[2] batch size
-- Returns how many were removed (call again while it equals the batch size).
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
if #ids > 0 then
  redis.call('ZREM', KEYS[1], unpack(ids))
  redis.call('HDEL', KEYS[2], unpack(ids))
  if redis.call('TYPE', KEYS[3]).ok == 'hash' then
    redis.call('HDEL', KEYS[3], unpack(ids))
  end
end
return #ids
