"""A node pool whose health and concurrency budget are shared by every instance of a profile, through Redis.

`SharedNodePool` is a `NodePool` (the gate and the commands use it unchanged) that keeps the in-process
state as its working copy and as its fallback:

- **Budget.** A lease on a node with a limit is granted by one Lua script in Redis that counts the
  node's leases of every instance (`redis_state.ACQUIRE`), within `ACQUIRE_TIMEOUT_S`; the local pool
  takes it too, so this instance's own counters stay right. Leases expire unless renewed each
  `RENEW_S`, so a killed instance's leases free themselves.
- **Health.** Each instance adds its outcomes to per-node, per-interval counters in Redis. At each
  interval's end (plus a grace for the last counts to land) exactly one instance claims the interval
  (`SET NX`), judges the cluster's failure rate with the same rules as alone (`NodeMonitor.judge`),
  logs the ejection and publishes the node's new state. The others apply it silently. Returns and k
  decreases follow from the shared state on every instance at once, by their timers; one instance
  (the first to claim the event) logs each.
- **Manual actions** (eject, drain, restore, reset) are published the same way, and so is a return
  that an active probe of this instance decided (`probe`: a held node returns when a probe passes).
- **Models.** With `health_scope: model`, a model's entry on a node (`NodeId` with a `model`) is shared
  like a node: its keys and messages name it `upstream url#model`. An instance takes on another's
  entry for a model it has no entry for yet only within its own cap (`MAX_MODELS_PER_NODE`).
- **Degraded.** When Redis is down or too slow, this instance goes on at once with its own state (its
  own limits and failure rate, as without `shared_state`), says so once, and retries every `RETRY_S`;
  back, it re-publishes what it holds (its leases, and any ejection longer than the shared one).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import math
import secrets
import time
from collections.abc import Callable, Iterator

from redis.exceptions import RedisError

from ..core.health import EjectionState, HealthEvent
from ..core.nodes import LocalLease, NodePool
from ..core.profile import Profile
from ..core.types import NodeId, Outcome
from .redis_state import COMMAND_TIMEOUT_S, RedisStore, Unavailable, parse_state

logger = logging.getLogger("llm_ha")

RENEW_S = 1.0  # how often held leases are renewed, the cluster's in-flight counts refreshed, liveness said
POLL_S = 2.0  # backstop for lost publications: every node's shared state is read this often
RETRY_S = 0.5  # while degraded: how often Redis is tried again
JUDGE_GRACE_S = 0.1  # after an interval ends, how long its last counts get to reach Redis


class SharedNodePool(NodePool):
    def __init__(self, profile: Profile, now: float, listener: Callable[[HealthEvent], None] | None = None,
                 *, instance: str) -> None:
        interval = profile.health_check.interval
        super().__init__(profile, math.floor(now / interval) * interval, listener)  # intervals aligned to the clock
        assert profile.shared_state
        self.instance = instance
        self.store = RedisStore(profile.shared_state, profile.name, instance)
        self.instances: list[str] = []
        self._by_key = {str(n): n for n in self.nodes}
        self._versions: dict[NodeId, int] = {}
        self._held: dict[NodeId, dict[str, SharedLease]] = {n: {} for n in self.nodes}
        self._lease_ids = itertools.count(1)
        self._lease_prefix = f"{instance}:{secrets.token_hex(3)}"  # a reloaded profile's pool reuses the instance id
        self._contributed: dict[int, set[NodeId]] = {}
        self._cluster_rates: dict[NodeId, tuple[int, float, int]] = {}  # node: (interval, failure rate, attempts)
        self._silent = False
        self._ejection_ends: dict[NodeId, float] = {}  # each node's last ejection, by when it was to end
        self._tasks: set[asyncio.Task] = set()
        self._runner: asyncio.Task | None = None

    # -- lifecycle
    async def start(self) -> None:
        """Connect in the background: until connected, this instance works on its own state."""
        if self._runner is None:
            self._runner = asyncio.create_task(self._run_forever())

    async def stop(self) -> None:
        if self._runner:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
        for task in list(self._tasks):
            task.cancel()
        if self.store.connected:
            with contextlib.suppress(RedisError, OSError, TimeoutError):
                async with asyncio.timeout(COMMAND_TIMEOUT_S):
                    await self.store.leave(self._held_members())
        await self.store.close()

    def describe(self) -> dict:
        return {**self.store.describe(), "instances": self.instances}

    # -- leases
    async def acquire(self, node: NodeId, now: float, *, streamed: bool,
                      over_limit: bool = False, health: NodeId | None = None) -> SharedLease | None:
        target = self.nodes[node]
        if not self.store.connected:
            return self._share_lease(self.try_acquire(node, now, streamed=streamed, over_limit=over_limit,
                                                      health=health))
        limit = target.limiter.limit(now)
        if limit is None or over_limit:
            lease = self._share_lease(self.try_acquire(node, now, streamed=streamed, over_limit=True, health=health))
            self.store.register(node, lease.member)
            lease.registered = True
            return lease
        if target.inflight >= limit:  # this instance alone fills it: no need to ask
            target.shed += 1
            return None
        member = self._new_member()
        try:
            granted, held = await self.store.acquire(node, member, limit)
        except Unavailable:
            if self.store.connected:  # late: refuse, the next candidate serves it (see ACQUIRE_TIMEOUT_S)
                target.shed += 1
                return None
            return self._share_lease(self.try_acquire(node, now, streamed=streamed, health=health), member)  # alone
        target.cluster_inflight = held
        if not granted:
            target.shed += 1
            return None
        lease = self._share_lease(self.try_acquire(node, now, streamed=streamed, over_limit=True, health=health),
                                  member)
        lease.registered = True
        return lease

    def _share_lease(self, local: LocalLease | None, member: str | None = None) -> SharedLease | None:
        if local is None:
            return None
        lease = SharedLease(self, local, member or self._new_member())
        self._held[local.node][lease.member] = lease
        return lease

    def _new_member(self) -> str:
        return f"{self._lease_prefix}:{next(self._lease_ids)}"

    def lease_ended(self, lease: SharedLease) -> None:
        self._held[lease.node].pop(lease.member, None)
        if lease.registered:
            self.store.release(lease.node, lease.member)
            node = self.nodes[lease.node]
            node.cluster_inflight = max(0, node.cluster_inflight - 1)

    def _held_members(self, registered_only: bool = False) -> dict[NodeId, list[str]]:
        return {node: [m for m, lease in held.items() if lease.registered or not registered_only]
                for node, held in self._held.items()}

    # -- health
    def _count(self, entry: NodeId, failed: bool, now: float) -> None:
        super()._count(entry, failed, now)
        if self.store.connected:
            interval = self._interval_of(now)
            self.store.count(entry, interval, failed, self._keep_counts_s())
            self._contributed.setdefault(interval, set()).add(entry)

    def _forget(self, entry: NodeId) -> None:
        super()._forget(entry)
        for known in (self._versions, self._ejection_ends, self._cluster_rates):
            known.pop(entry, None)

    def _entry_named(self, key: str, make: bool) -> NodeId | None:
        """The node or model entry a message names (`upstream url` or `upstream url#model`), if kept here."""
        if key in self._by_key:
            return self._by_key[key]
        for name, node in self._by_key.items():
            if key.startswith(name + "#"):
                return self._kept(node.for_model(key[len(name) + 1:]), make)
        return None

    def _kept(self, entry: NodeId, make: bool = True) -> NodeId | None:
        """`entry`, made if asked and this instance has room for it; None if it is not kept here."""
        if entry in self.detector.monitors:
            return entry
        if not make:
            return None
        made = self.health_entry(entry.node, entry.model, time.time())
        return made if made == entry else None

    def _health_entries(self) -> list[NodeId]:
        return list(self.detector.monitors)

    def eject(self, node: NodeId, now: float) -> None:
        super().eject(node, now)
        self._publish_state(node)

    def drain(self, node: NodeId, now: float, duration: float) -> None:
        super().drain(node, now, duration)
        self._publish_state(node)

    def restore(self, node: NodeId, now: float) -> None:
        super().restore(node, now)
        for entry in [node, *self.model_entries(node)]:
            self._publish_state(entry)

    def reset(self, now: float) -> None:
        super().reset(now)
        if self.store.connected:
            for entry in self._health_entries():
                self._publish_state(entry)
            self._spawn(self.store.publish({"kind": "reset"}))

    def probe_result(self, node: NodeId, passed: bool, now: float) -> None:
        """This instance's probe may end the node's ejection: then for every instance."""
        monitor = self.detector.monitors[node]
        was_ejected = monitor.is_ejected(now)
        super().probe_result(node, passed, now)
        if was_ejected and not monitor.is_ejected(now):
            self._publish_state(node)

    def snapshot(self, node: NodeId, now: float) -> dict:
        snap = super().snapshot(node, now)
        interval, rate, attempts = self._cluster_rates.get(node, (0, 0.0, 0))
        if interval < self._interval_of(now) - 2:  # nobody judged it lately: no attempts anywhere
            rate, attempts = 0.0, 0
        snap["cluster"] = {"inflight": self.nodes[node].cluster_inflight, "failure_rate": round(rate, 2),
                           "requests_per_s": round(attempts / self.profile.health_check.interval, 2)}
        return snap

    def _on_health_event(self, event: HealthEvent) -> None:
        node = NodeId(event.upstream, event.node, event.model or "")
        self._node_follows(event)
        if (until := self.detector.monitors[node].ejected_until) is not None:
            self._ejection_ends[node] = until
        if not self.listener or self._silent:
            return
        if event.action == "eject" or event.by == "hand" or not self.store.connected:
            self.listener(event)  # decided here: by hand, by this instance's judgement, or alone
        else:  # a timer or a probe, on every instance at once: the first to claim it logs it
            self._spawn(self._claim_and_report(node, event))

    def _event_identity(self, node: NodeId, event: HealthEvent) -> str:
        """The same on every instance: a hold or return is its ejection's (named by when it was to end)."""
        if event.action in ("hold", "uneject"):
            return f"{event.action}:{self._ejection_ends.get(node, event.ts):.3f}"
        return f"{event.action}:{event.ts:.3f}"

    async def _claim_and_report(self, node: NodeId, event: HealthEvent) -> None:
        try:
            async with asyncio.timeout(COMMAND_TIMEOUT_S):
                mine = await self.store.claim_event(node, self._event_identity(node, event), self._keep_claims_s())
        except (RedisError, OSError, TimeoutError):
            mine = True  # better twice in the logs than never
        if mine and self.listener:
            self.listener(event)

    @contextlib.contextmanager
    def _silently(self) -> Iterator[None]:
        """Apply what another instance did and reported: no second event here."""
        self._silent = True
        try:
            yield
        finally:
            self._silent = False

    def _publish_state(self, node: NodeId) -> None:
        if self.store.connected:
            self._spawn(self._put_state(node))

    async def _put_state(self, node: NodeId, merge: bool = False) -> None:
        if node not in self.detector.monitors:  # a model's entry dropped meanwhile
            return
        try:
            version = await self.store.put_state(node, self.detector.monitors[node].ejection_state(), merge)
        except (RedisError, OSError) as e:
            self.store.fail(e)
            return
        if version:
            self._versions[node] = max(version, self._versions.get(node, 0))

    def _apply(self, node: NodeId, version: int, by: str, state: EjectionState) -> None:
        """Take on a state another instance decided (newer than what this one has seen), silently."""
        if version <= self._versions.get(node, 0) or node not in self.detector.monitors:
            return
        self._versions[node] = version
        now = time.time()
        self.advance(now)  # what was due under the old state happens first (and is named after it)
        if state.ejected_until is not None:
            self._ejection_ends[node] = state.ejected_until
        monitor = self.detector.monitors[node]
        was_ejected = monitor.is_ejected(now)
        self.detector.apply(node, state)
        if monitor.is_ejected(now) and not was_ejected:
            logger.info(f"llm-ha: {node} ejected by instance {by} for {state.ejected_until - now:.1f}s more "
                        f"(k={state.ejection_k})")
        elif was_ejected and not monitor.is_ejected(now):
            self._node_follows(HealthEvent(now, "uneject", node.upstream, node.url, k=state.next_k,
                                           model=node.model or None))
            logger.info(f"llm-ha: {node} back in rotation (by instance {by})")

    def _interval_of(self, ts: float) -> int:
        return math.floor(ts / self.profile.health_check.interval + 1e-9)

    def _keep_counts_s(self) -> float:
        return 10 * self.profile.health_check.interval + 10

    def _keep_claims_s(self) -> float:
        return max(3600.0, 2 * self.profile.health_check.max_ejection_time)

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)  # asyncio keeps only weak references to tasks
        task.add_done_callback(self._tasks.discard)

    # -- the connection: a session per connection, run until Redis fails, then again
    async def _run_forever(self) -> None:
        while True:
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError, TimeoutError, Unavailable) as e:
                self.store.fail(e)
            except Exception as e:
                logger.exception("llm-ha: shared state failed")
                self.store.fail(e)
            self.detector.judging = True
            await asyncio.sleep(RETRY_S)

    async def _session(self) -> None:
        pubsub = self.store.client.pubsub(ignore_subscribe_messages=True)
        try:
            async with asyncio.timeout(5 * COMMAND_TIMEOUT_S):
                await self.store.warm_up()
                await pubsub.subscribe(self.store.channel)  # before reading the states: no change is missed
                await self._synchronise()
            self.store.became_connected()
            self.detector.judging = False  # from now on the cluster's failure rate decides
            loops = [self._listen(pubsub), self.store.write_forever(), self._renew_forever(), self._poll_forever(),
                     self._judge_forever(), self.store.broken.wait()]
            tasks = [asyncio.create_task(loop) for loop in loops]
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in tasks:
                    task.cancel()
            for task in done:
                if not task.cancelled() and task.exception():
                    raise task.exception()
            raise Unavailable(self.store.error or "Redis went away")
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()

    async def _synchronise(self) -> None:
        """After (re)connecting: re-publish what this instance holds, then take on what the others decided."""
        self._versions.clear()  # Redis may have restarted empty: its versions start again
        self._contributed.clear()
        for entry in self._health_entries():
            await self._put_state_or_fail(entry)
        await self._pull_states()
        await self.store.renew(self._held_members(), re_add=True)
        for held in self._held.values():
            for lease in held.values():
                lease.registered = True

    async def _put_state_or_fail(self, node: NodeId) -> None:
        if node not in self.detector.monitors:
            return
        version = await self.store.put_state(node, self.detector.monitors[node].ejection_state(), merge=True)
        if version:
            self._versions[node] = version

    async def _pull_states(self) -> None:
        for node, (version, by, state) in (await self.store.read_states(self._health_entries())).items():
            self._apply(node, version, by, state)

    async def _listen(self, pubsub) -> None:
        async for message in pubsub.listen():
            if message.get("type") == "message":
                self._on_message(message["data"])

    def _on_message(self, data: str) -> None:
        try:
            message = json.loads(data)
        except ValueError:
            return
        if message.get("from") == self.instance:
            return
        kind = message.get("kind")
        node = self._entry_named(str(message.get("node", "")), make=kind == "state")
        if kind == "state" and node:
            self._apply(node, int(message["version"]), message["from"], parse_state(message["fields"]))
        elif kind == "rate" and node:
            self._cluster_rates[node] = (message["interval"], message["failure_rate"], message["attempts"])
        elif kind == "reset":
            logger.info(f"llm-ha: health state reset by instance {message['from']}")
            with self._silently():
                NodePool.reset(self, time.time())

    async def _renew_forever(self) -> None:
        while True:
            async with asyncio.timeout(COMMAND_TIMEOUT_S):
                counts = await self.store.renew(self._held_members(registered_only=True))
                self.instances = await self.store.heartbeat(RENEW_S)
            for node, count in counts.items():
                self.nodes[node].cluster_inflight = count
            await asyncio.sleep(RENEW_S)

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(POLL_S)
            async with asyncio.timeout(COMMAND_TIMEOUT_S):
                await self._pull_states()

    async def _judge_forever(self) -> None:
        """At each interval's end (plus a grace), judge the nodes this instance sent attempts to in it."""
        length = self.profile.health_check.interval
        grace = min(JUDGE_GRACE_S, length / 2)
        interval = self._interval_of(time.time())
        while True:
            await asyncio.sleep(max(0.0, (interval + 1) * length + grace - time.time()))
            for node in self._contributed.pop(interval, set()):
                await self._judge(node, interval)
            for stale in [i for i in self._contributed if i < interval]:
                del self._contributed[stale]
            interval = max(interval + 1, self._interval_of(time.time() - grace) - 1)  # fell behind: skip

    async def _judge(self, node: NodeId, interval: int) -> None:
        """Judge one node's interval on every instance's counts, if this instance is the first to claim it."""
        length = self.profile.health_check.interval
        async with asyncio.timeout(COMMAND_TIMEOUT_S):
            counts = await self.store.claim_interval(node, interval, self._keep_counts_s())
        if counts is None or self._kept(node) is None:
            return
        total, failed = counts
        rate = 100.0 * failed / total if total else 0.0
        self._cluster_rates[node] = (interval, rate, total)
        event = self.detector.judge(node, (interval + 1) * length, total, failed, time.time())
        async with asyncio.timeout(COMMAND_TIMEOUT_S):
            await self.store.publish({"kind": "rate", "node": str(node), "interval": interval,
                                      "failure_rate": rate, "attempts": total})
            if event:
                await self._put_state(node)


class SharedLease:
    """A lease of this instance's pool (its own counters), also held in Redis (the cluster's budget)."""

    def __init__(self, pool: SharedNodePool, local: LocalLease, member: str) -> None:
        self._pool = pool
        self._local = local
        self.node = local.node
        self.member = member
        self.registered = False  # in Redis: released there too

    def first_byte(self, ttfb_s: float | None, now: float) -> None:
        self._local.first_byte(ttfb_s, now)

    def release(self, outcome: Outcome, now: float, ttfb_s: float | None = None) -> None:
        if self._local.released:
            return
        self._local.release(outcome, now, ttfb_s)
        self._pool.lease_ended(self)
