"""The Redis side of shared state: key names, the Lua scripts, and the connection's health.

Everything one profile shares lives under `llmha:{profile name}:`, so two profiles can use one Redis:

| key | type | what |
|---|---|---|
| `state:{node}` | hash | the node's ejection: `next_k`, `ejection_k`, `ejected_until`, `ejections`, `healthy_since`, ... |
| `leases:{node}` | sorted set | one member per attempt in flight on the node, scored by its expiry (ms, Redis's clock) |
| `counts:{node}:{interval}` | hash | the interval's finished attempts (`t`) and failures (`f`), every instance's |
| `judged:{node}:{interval}` | string | the instance that judged the interval (`SET NX`: exactly one does) |
| `claimed:{node}:{action}:{id}` | string | the instance that logs a hold, return or k decrease every instance sees |
| `instances` | sorted set | live instances, scored by the expiry of their last heartbeat |
| `events` | channel | state changes, resets and each judged interval's cluster failure rate |

Leases expire unless their holder renews them, so an instance killed with `kill -9` frees its share of
a node's budget within `LEASE_TTL_S`. Times in the lease scripts are Redis's own (`TIME`), so instances
on machines whose clocks differ agree on what has expired.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from urllib.parse import unquote, urlsplit

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from ..core.health import EjectionState
from ..core.profile import masked_url
from ..core.types import NodeId

logger = logging.getLogger("llm_ha")

LEASE_TTL_S = 5.0  # a lease not renewed for this long is gone (its holder died or lost Redis)
# The longest a request waits for a lease from Redis. Mostly the proxy's own event loop is what is slow
# (a loopback round trip is ~0.6 ms), so a late answer refuses the lease: the request goes to the next
# candidate (the budget stays strict, the client is served); a few in a row and the instance degrades.
ACQUIRE_TIMEOUT_S = 0.025
TIMEOUTS_TO_DEGRADE = 3
WARM_CONNECTIONS = 8  # opened at each connection so the first requests do not pay for connecting
CONNECT_TIMEOUT_S = 0.5
COMMAND_TIMEOUT_S = 1.0  # background commands (renewals, judgements, publications)
KEEP_STATE_S = 86_400.0  # a node's shared state outlives every instance by a day

# KEYS[1]: the node's leases. ARGV: member, limit (-1: none), ttl ms. Returns {granted 0|1, held after}.
ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local held = redis.call('ZCARD', KEYS[1])
local limit = tonumber(ARGV[2])
if limit >= 0 and held >= limit then
  return {0, held}
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], 2 * tonumber(ARGV[3]))
return {1, redis.call('ZCARD', KEYS[1])}
"""

# KEYS[1]: the node's leases. ARGV: ttl ms, '1' to re-add missing members (after a reconnection) or '0'
# to renew only those still there (a released lease is never brought back), members... Returns the count.
RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local expiry = now + tonumber(ARGV[1])
for i = 3, #ARGV do
  if ARGV[2] == '1' then
    redis.call('ZADD', KEYS[1], expiry, ARGV[i])
  else
    redis.call('ZADD', KEYS[1], 'XX', expiry, ARGV[i])
  end
end
if #ARGV > 2 then
  redis.call('PEXPIRE', KEYS[1], 2 * tonumber(ARGV[1]))
end
return redis.call('ZCARD', KEYS[1])
"""

# KEYS[1]: the node's state. ARGV: channel, ttl ms, 'set' | 'merge', instance, node, then field/value
# pairs. 'merge' (re-publishing after an outage) writes only if Redis has no state for the node or an
# ejection that ends earlier. Publishes the state with its new version; returns the version, 0 if kept.
PUT_STATE = """
local fields = {}
for i = 6, #ARGV, 2 do
  fields[ARGV[i]] = ARGV[i + 1]
end
if ARGV[3] == 'merge' and redis.call('EXISTS', KEYS[1]) == 1 then
  local theirs = tonumber(redis.call('HGET', KEYS[1], 'ejected_until') or '') or -1
  local ours = tonumber(fields['ejected_until']) or -1
  if ours <= theirs then
    return 0
  end
end
for name, value in pairs(fields) do
  redis.call('HSET', KEYS[1], name, value)
end
redis.call('HSET', KEYS[1], 'by', ARGV[4])
local version = redis.call('HINCRBY', KEYS[1], 'version', 1)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PUBLISH', ARGV[1], cjson.encode({kind = 'state', from = ARGV[4], node = ARGV[5],
                                             version = version, fields = fields}))
return version
"""

# KEYS[1]: the interval's judged key, KEYS[2]: its counts. ARGV: instance, ttl ms.
# The first instance to ask gets the counts and judges; the others get nil.
CLAIM_INTERVAL = """
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return false
end
return redis.call('HMGET', KEYS[2], 't', 'f')
"""

STATE_FIELDS = ("next_k", "ejection_k", "ejected_until", "ejections", "healthy_since")


class Unavailable(Exception):
    """Redis cannot be used now: the caller falls back to this instance's own state."""


def state_fields(state: EjectionState) -> dict[str, str]:
    """The hash fields of a node's state; floats as repr, so every instance reads back the same float."""
    return {"next_k": str(state.next_k), "ejection_k": str(state.ejection_k),
            "ejected_until": "" if state.ejected_until is None else repr(state.ejected_until),
            "ejections": str(state.ejections), "healthy_since": repr(state.healthy_since),
            "ejection_failure_rate": "" if state.ejection_failure_rate is None else repr(state.ejection_failure_rate)}


def parse_state(fields: dict[str, str]) -> EjectionState:
    until, rate = fields["ejected_until"], fields.get("ejection_failure_rate")
    return EjectionState(next_k=int(fields["next_k"]), ejection_k=int(fields["ejection_k"]),
                         ejected_until=float(until) if until else None, ejections=int(fields["ejections"]),
                         healthy_since=float(fields["healthy_since"]), ejection_failure_rate=float(rate) if rate else None)


class RedisStore:
    """One profile's keys in one Redis, and whether Redis can be used now (`connected`)."""

    def __init__(self, url: str, namespace: str, instance: str) -> None:
        self.url = url
        self.shown_url = masked_url(url)
        self.instance = instance
        self.prefix = f"llmha:{namespace}:"
        self.channel = self.prefix + "events"
        self._password = unquote(urlsplit(url).password or "")
        self.client = redis.from_url(url, decode_responses=True, socket_connect_timeout=CONNECT_TIMEOUT_S,
                                     socket_timeout=COMMAND_TIMEOUT_S, retry=Retry(NoBackoff(), 0))
        self._acquire = self.client.register_script(ACQUIRE)
        self._renew = self.client.register_script(RENEW)
        self._put_state = self.client.register_script(PUT_STATE)
        self._claim_interval = self.client.register_script(CLAIM_INTERVAL)
        self.connected = False
        self.since = time.time()
        self.error: str | None = "not connected yet"
        self.broken = asyncio.Event()  # set when a caller found Redis unusable: the session restarts
        self.timeouts = 0  # acquires given up, in all
        self.acquire_times: deque[float] = deque(maxlen=1000)  # seconds, the last answered acquires
        self._timeouts_in_a_row = 0
        self._said_degraded = False
        self._writes: asyncio.Queue[Callable] = asyncio.Queue()

    # -- key names
    def state_key(self, node: NodeId) -> str:
        return f"{self.prefix}state:{node}"

    def leases_key(self, node: NodeId) -> str:
        return f"{self.prefix}leases:{node}"

    def counts_key(self, node: NodeId, interval: int) -> str:
        return f"{self.prefix}counts:{node}:{interval}"

    # -- connection health
    def became_connected(self) -> None:
        was_degraded = self._said_degraded
        self.connected, self.since, self.error = True, time.time(), None
        self._timeouts_in_a_row = 0
        self._said_degraded = False
        self.broken.clear()
        if was_degraded:
            logger.warning(f"llm-ha: shared state {self.shown_url} is back: sharing health and limits again")
        else:
            logger.info(f"llm-ha: shared state at {self.shown_url}, instance {self.instance}")

    def fail(self, error: BaseException | str) -> None:
        """Redis is unusable: go on with this instance's own state at once; said once per outage."""
        self.error = self.scrub(str(error) or type(error).__name__)
        if self.connected:
            self.connected, self.since = False, time.time()
        self.broken.set()
        self._drop_writes()
        if not self._said_degraded:
            self._said_degraded = True
            logger.warning(f"llm-ha: shared state {self.shown_url} unusable ({self.error}): "
                           "this instance uses its own health and limits until it is back")

    def scrub(self, text: str) -> str:
        return text.replace(self._password, "***") if self._password else text

    def describe(self) -> dict:
        times = sorted(self.acquire_times)
        described = {"url": self.shown_url, "state": "connected" if self.connected else "degraded",
                     "since": self.since, "acquire_timeouts": self.timeouts,
                     "acquire_ms_p50": _percentile_ms(times, 0.5), "acquire_ms_p99": _percentile_ms(times, 0.99)}
        if self.error:
            described["error"] = self.error
        return described

    async def close(self) -> None:
        await self.client.aclose()

    async def warm_up(self) -> None:
        await asyncio.gather(*(self.client.ping() for _ in range(WARM_CONNECTIONS)))

    # -- the budget
    async def acquire(self, node: NodeId, member: str, limit: int) -> tuple[bool, int]:
        """A lease on `node` within `limit` across every instance: (granted, leases held after).

        Waits at most ACQUIRE_TIMEOUT_S. A late answer is not cancelled (that would cost the connection):
        it completes in the background, and a lease it granted is given back at once.
        """
        started = time.monotonic()
        call = asyncio.ensure_future(self._acquire(keys=[self.leases_key(node)],
                                                   args=[member, limit, _ms(LEASE_TTL_S)]))
        done, _ = await asyncio.wait({call}, timeout=ACQUIRE_TIMEOUT_S)
        if not done:
            call.add_done_callback(lambda late: self._give_back(late, node, member))
            self._timed_out()
            raise Unavailable("timeout")
        try:
            granted, held = call.result()
        except (RedisError, OSError) as e:
            self.fail(e)
            raise Unavailable(str(e)) from None
        self.acquire_times.append(time.monotonic() - started)
        self._timeouts_in_a_row = 0
        return bool(granted), int(held)

    def _timed_out(self) -> None:
        self.timeouts += 1
        self._timeouts_in_a_row += 1
        if self._timeouts_in_a_row >= TIMEOUTS_TO_DEGRADE:
            self.fail(f"{self._timeouts_in_a_row} lease requests in a row took over {ACQUIRE_TIMEOUT_S * 1000:g} ms")

    def _give_back(self, late: asyncio.Future, node: NodeId, member: str) -> None:
        if not late.cancelled() and late.exception() is None and late.result()[0]:
            self.release(node, member)

    def register(self, node: NodeId, member: str) -> None:
        """Count a lease taken past the limit (or on a node without one) in the cluster's in-flight."""
        self.write(lambda pipe: self._acquire(keys=[self.leases_key(node)], args=[member, -1, _ms(LEASE_TTL_S)],
                                              client=pipe))

    def release(self, node: NodeId, member: str) -> None:
        self.write(lambda pipe: pipe.zrem(self.leases_key(node), member))

    async def renew(self, held: dict[NodeId, list[str]], re_add: bool = False) -> dict[NodeId, int]:
        """Push the expiry of this instance's leases; every node's count of leases (all instances')."""
        pipe = self.client.pipeline(transaction=False)
        for node, members in held.items():
            await self._renew(keys=[self.leases_key(node)], args=[_ms(LEASE_TTL_S), int(re_add), *members],
                              client=pipe)
        counts = await pipe.execute()
        return {node: int(count) for node, count in zip(held, counts)}

    async def heartbeat(self, every_s: float) -> list[str]:
        """Say this instance is alive; the live instances."""
        now = time.time()
        key = self.prefix + "instances"
        pipe = self.client.pipeline(transaction=False)
        pipe.zadd(key, {self.instance: now + 3 * every_s})
        pipe.zremrangebyscore(key, "-inf", now)
        pipe.zrange(key, 0, -1)
        pipe.pexpire(key, _ms(10 * every_s))
        return (await pipe.execute())[2]

    async def leave(self, held: dict[NodeId, list[str]]) -> None:
        pipe = self.client.pipeline(transaction=False)
        pipe.zrem(self.prefix + "instances", self.instance)
        for node, members in held.items():
            if members:
                pipe.zrem(self.leases_key(node), *members)
        await pipe.execute()

    # -- health
    def count(self, node: NodeId, interval: int, failed: bool, keep_s: float) -> None:
        key = self.counts_key(node, interval)

        def add(pipe) -> None:
            pipe.hincrby(key, "t", 1)
            if failed:
                pipe.hincrby(key, "f", 1)
            pipe.pexpire(key, _ms(keep_s))

        self.write(add)

    async def claim_interval(self, node: NodeId, interval: int, keep_s: float) -> tuple[int, int] | None:
        """The cluster's (attempts, failures) on `node` in `interval` if this instance is the one to judge it."""
        counts = await self._claim_interval(keys=[f"{self.prefix}judged:{node}:{interval}",
                                                  self.counts_key(node, interval)],
                                            args=[self.instance, _ms(keep_s)])
        if counts is None:
            return None
        total, failed = counts
        return int(total or 0), int(failed or 0)

    async def claim_event(self, node: NodeId, identity: str, keep_s: float) -> bool:
        """True for exactly one instance per (node, event identity): the one that logs the event."""
        key = f"{self.prefix}claimed:{node}:{identity}"
        return bool(await self.client.set(key, self.instance, nx=True, px=_ms(keep_s)))

    async def put_state(self, node: NodeId, state: EjectionState, merge: bool = False) -> int:
        fields = [x for item in state_fields(state).items() for x in item]
        return int(await self._put_state(
            keys=[self.state_key(node)],
            args=[self.channel, _ms(KEEP_STATE_S), "merge" if merge else "set", self.instance, str(node), *fields]))

    async def read_states(self, nodes: list[NodeId]) -> dict[NodeId, tuple[int, str, EjectionState]]:
        """Every node's shared (version, deciding instance, state), for those Redis has."""
        pipe = self.client.pipeline(transaction=False)
        for node in nodes:
            pipe.hgetall(self.state_key(node))
        found = {}
        for node, fields in zip(nodes, await pipe.execute()):
            if fields and all(f in fields for f in STATE_FIELDS):
                found[node] = (int(fields.get("version", 0)), fields.get("by", "?"), parse_state(fields))
        return found

    async def publish(self, message: dict) -> None:
        await self.client.publish(self.channel, json.dumps({**message, "from": self.instance}))

    # -- writes that need no answer (releases, counts), sent in batches by one task, in order
    def write(self, op: Callable) -> None:
        if self.connected:
            self._writes.put_nowait(op)

    async def write_forever(self) -> None:
        while True:
            ops = [await self._writes.get()]
            while not self._writes.empty() and len(ops) < 512:
                ops.append(self._writes.get_nowait())
            pipe = self.client.pipeline(transaction=False)
            for op in ops:
                result = op(pipe)
                if asyncio.iscoroutine(result):
                    await result
            await pipe.execute()

    def _drop_writes(self) -> None:
        while not self._writes.empty():
            self._writes.get_nowait()


def _percentile_ms(ordered: list[float], q: float) -> float | None:
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 2) if ordered else None


def _ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))
