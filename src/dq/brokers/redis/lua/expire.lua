-- Expire dead letters older than the dead-message TTL, a batch at a time.
-- Core: a dead letter's life ends here (Dramatiq's maintenance does the same).
--
-- KEYS[1] ns:C.XQ   KEYS[2] ns:C.XQ.msgs
-- ARGV[1] cutoff (ms)   ARGV[2] batch size
-- Returns how many were removed (call again while it equals the batch size).
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
if #ids > 0 then
  redis.call('ZREM', KEYS[1], unpack(ids))
  redis.call('HDEL', KEYS[2], unpack(ids))
end
return #ids
