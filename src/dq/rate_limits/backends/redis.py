"""`RedisBackend`: rate-limiter counters on Redis, shared with Dramatiq's limiters."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import redis

from dq.rate_limits.backend import RateLimiterBackend

__all__ = ["RedisBackend"]

# Each primitive is one script call: atomic without Dramatiq's WATCH/MULTI retry
# loops, with the same effects. A counter is a decimal integer string (a missing key
# counts as 0); a successful write is ``SET key value PX ttl`` (refreshing the TTL);
# a refused one writes nothing.

#: KEYS[1] counter; ARGV amount (signed), bound, ttl ms, "max" or "min".
_STEP = """
local raw = redis.call("GET", KEYS[1])
local value = 0
if raw then
  value = tonumber(raw)
  if value == nil or value ~= math.floor(value) then
    return redis.error_reply("ERR rate limiter key " .. KEYS[1] .. " holds a non-integer value")
  end
end
value = value + tonumber(ARGV[1])
local bound = tonumber(ARGV[2])
if ARGV[4] == "max" then
  if value > bound then return 0 end
elseif value < bound then
  return 0
end
redis.call("SET", KEYS[1], string.format("%d", value), "PX", ARGV[3])
return 1
"""

#: KEYS[1] counter, KEYS[2..] counters to sum; ARGV amount, maximum, ttl ms.
_INCR_AND_SUM = """
local amount = tonumber(ARGV[1])
local maximum = tonumber(ARGV[2])
local value = tonumber(redis.call("GET", KEYS[1]) or "0")
if value == nil then
  return redis.error_reply("ERR rate limiter key " .. KEYS[1] .. " holds a non-integer value")
end
value = value + amount
if value > maximum then return 0 end
local total = amount
if #KEYS > 1 then
  local others = {}
  for i = 2, #KEYS do others[#others + 1] = KEYS[i] end
  for _, raw in ipairs(redis.call("MGET", unpack(others))) do
    if raw then total = total + (tonumber(raw) or 0) end
  end
end
if total > maximum then return 0 end
redis.call("SET", KEYS[1], string.format("%d", value), "PX", ARGV[3])
return 1
"""


class RedisBackend(RateLimiterBackend):
    """Rate-limiter counters on Redis.

    Keys and values are Dramatiq's (section 7 of the wire reference): a limiter here
    and a Dramatiq limiter with the same key share the limit. Each operation is one
    Lua script call, atomic where Dramatiq loops on WATCH.

    Args:
        client: a ``redis.Redis`` to use as it is (exposed as `client`); the other
            arguments are then ignored.
        url: a Redis URL (``redis://host:6379/0``); wins over ``parameters``.
        parameters: keyword arguments of ``redis.Redis``.
    """

    def __init__(
        self, *, client: redis.Redis | None = None, url: str | None = None, **parameters: Any
    ) -> None:
        if client is not None:
            self.client: redis.Redis = client
        elif url is not None:
            self.client = redis.Redis(connection_pool=redis.ConnectionPool.from_url(url))
        else:
            self.client = redis.Redis(**parameters)
        self._step = self.client.register_script(_STEP)
        self._incr_and_sum = self.client.register_script(_INCR_AND_SUM)

    def add(self, key: str, value: int, ttl: int) -> bool:
        return bool(self.client.set(key, value, px=ttl, nx=True))

    def incr(self, key: str, amount: int, maximum: int, ttl: int) -> bool:
        return self._call_step(key, amount, maximum, ttl, "max")

    def decr(self, key: str, amount: int, minimum: int, ttl: int) -> bool:
        return self._call_step(key, -amount, minimum, ttl, "min")

    def incr_and_sum(
        self, key: str, keys: Callable[[], list[str]], amount: int, maximum: int, ttl: int
    ) -> bool:
        return bool(self._incr_and_sum(keys=[key, *keys()], args=[amount, maximum, ttl]))

    def wait(self, key: str, timeout: int | None) -> bool:
        """Block until ``key`` holds a notification, or ``timeout`` ms pass.

        A notification stays in the list (it is rotated, not removed), so every
        party waiting, now or later within its TTL, sees it. Sub-second timeouts
        are honoured (Dramatiq requires at least 1000 ms); ``None`` waits as long
        as it takes.

        Raises:
            ValueError: ``timeout`` is not positive.
        """
        if timeout is None:
            seconds = 0.0  # BLMOVE's "no limit"
        elif timeout > 0:
            seconds = timeout / 1000
        else:
            raise ValueError(f"wait timeout must be None or > 0 ms, got {timeout!r}")
        # BLMOVE RIGHT LEFT on one key is BRPOPLPUSH (deprecated since Redis 6.2),
        # with a fractional timeout.
        event = self.client.blmove(
            key,
            key,
            seconds,  # type: ignore[arg-type]  # typed int; Redis takes fractional seconds
            src="RIGHT",
            dest="LEFT",
        )
        return event in (b"x", "x")

    def wait_notify(self, key: str, ttl: int) -> None:
        with self.client.pipeline(transaction=True) as pipe:
            pipe.rpush(key, b"x")
            pipe.pexpire(key, ttl)
            pipe.execute()

    def _call_step(self, key: str, amount: int, bound: int, ttl: int, kind: str) -> bool:
        return bool(self._step(keys=[key], args=[amount, bound, ttl, kind]))
