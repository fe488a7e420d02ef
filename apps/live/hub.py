"""A web process's one Redis subscription per followed run, shared by all of that process's
followers of the run (WebSocket and SSE alike).

The publisher's script (feed.APPEND_SCRIPT) publishes each batch of a run's frames on the
run's channel as `<first seq> <last seq>\\n` and the frames' JSON, one per line. The hub
reads those messages on one connection per process (per event loop), parses only the
header, and offers one Batch, shared, to every listener of the run: a WebSocket follower
sends its frames on as one JSON array's items, an SSE follower as events; neither parses
them nor reads Redis for them.

A listener is registered before it first reads storage, and `follow` returns only once
Redis has confirmed the subscription, so nothing published after that read can be missed.
When the connection to Redis breaks, every listener is told to `resync` (read storage
again) once the hub has subscribed again: the feed's frames are in storage, so a broken
subscription delays frames but never loses them.

Fairness: the messages waiting on the socket are taken together and handed out round
robin across tenants, so one tenant's hundreds of busy runs do not queue ahead of
another's few.
"""

import asyncio
import contextlib
import logging
from collections import deque
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Protocol

from apps.live import feed

logger = logging.getLogger(__name__)

DRAIN_MAX = 2000  # messages taken off the socket per round
SUBSCRIBE_WAIT_S = 5.0  # a follower waits at most this long for its run's subscription
RECONNECT_S = (0.1, 2.0)  # first and longest wait before subscribing again after an error
# Always subscribed, so the connection and the reader exist before the first run's follower.
HUB_CHANNEL = "sluice:feed:hub"


class Batch:
    """Frames first..last of a run as published: their JSON texts, one per line."""

    def __init__(self, first: int, last: int, lines: str) -> None:
        self.first, self.last, self.lines = first, last, lines

    @cached_property
    def array_items(self) -> str:
        """The frames as the items of a JSON array (a WebSocket message's)."""
        return self.lines.replace("\n", ",")

    @cached_property
    def frames(self) -> list[tuple[int, str]]:
        """(seq, JSON text) of each frame."""
        return list(zip(range(self.first, self.last + 1), self.lines.split("\n"), strict=True))


class Listener(Protocol):
    def offer(self, batch: Batch) -> None:
        """Called on the event loop's thread, in seq order as published; must not block or
        await."""

    def resync(self) -> None:
        """Frames may have been missed: read storage again."""


@dataclass(eq=False)
class _Run:
    tenant_id: int
    listeners: set[Listener] = field(default_factory=set)
    ready: asyncio.Event = field(default_factory=asyncio.Event)  # subscribed, confirmed
    # Subscribed again after the connection broke: its listeners must read storage again.
    resync: bool = False


class FeedHub:
    def __init__(self) -> None:
        self._runs: dict[bytes, _Run] = {}
        # SUBSCRIBEs sent on this connection and not yet confirmed, per channel. A run is
        # ready when all of its are: confirmations come in order, so the last one follows
        # any UNSUBSCRIBE sent before it. Kept apart from _Run, which a channel's last
        # follower leaving ends while its confirmation may still be on the way.
        self._unconfirmed: dict[bytes, int] = {}
        self._pubsub: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._started = asyncio.Lock()

    # -- followers ------------------------------------------------------------------

    async def follow(self, tenant_id: int, run_id: object, listener: Listener) -> None:
        """Registers the listener; returns once the run's subscription is confirmed."""
        await self._start()
        channel = feed.run_channel(tenant_id, run_id).encode()
        run = self._runs.get(channel)
        if run is None:
            run = self._runs[channel] = _Run(tenant_id)
            run.listeners.add(listener)
            await self._subscribe(channel, run)
        else:
            run.listeners.add(listener)
        try:
            async with asyncio.timeout(SUBSCRIBE_WAIT_S):
                await run.ready.wait()
        except TimeoutError:
            # Redis is slow or away: go on from storage; when the subscription is
            # confirmed, the run's listeners read storage again for what came meanwhile.
            logger.warning("feed hub: run %s not subscribed after %s s", run_id, SUBSCRIBE_WAIT_S)
            run.resync = True

    async def leave(self, tenant_id: int, run_id: object, listener: Listener) -> None:
        channel = feed.run_channel(tenant_id, run_id).encode()
        run = self._runs.get(channel)
        if run is None:
            return
        run.listeners.discard(listener)
        if not run.listeners:
            del self._runs[channel]
            try:
                await self._pubsub.unsubscribe(channel)
            except Exception:  # the reader resubscribes only what is still followed
                logger.warning("feed hub: unsubscribing %s failed", channel, exc_info=True)

    def followed_runs(self) -> int:
        return len(self._runs)

    # -- the subscription -------------------------------------------------------------

    async def _start(self) -> None:
        if self._reader is not None and not self._reader.done():
            return
        async with self._started:
            if self._reader is not None and not self._reader.done():
                return
            self._pubsub = feed.async_feed_redis().pubsub()
            await self._pubsub.subscribe(HUB_CHANNEL)
            self._reader = asyncio.create_task(self._read(), name="sluice-feed-hub")

    async def _subscribe(self, channel: bytes, run: _Run) -> None:
        self._unconfirmed[channel] = self._unconfirmed.get(channel, 0) + 1
        run.ready.clear()
        try:
            await self._pubsub.subscribe(channel)
        except Exception:
            # The reader is reconnecting; it subscribes every followed run and tells
            # them to resync, which sets `ready`.
            logger.warning("feed hub: subscribing %s failed", channel, exc_info=True)

    async def _read(self) -> None:
        failures = 0
        while True:
            try:
                await self._pump()
            except asyncio.CancelledError:
                raise
            except Exception:
                failures += 1
                wait = min(RECONNECT_S[0] * 2 ** (failures - 1), RECONNECT_S[1])
                logger.warning("feed hub: subscription lost; again in %.1f s", wait, exc_info=True)
                await asyncio.sleep(wait)
                try:
                    await self._resubscribe()
                except Exception:
                    logger.warning("feed hub: subscribing again failed", exc_info=True)
                    continue
                failures = 0

    async def _resubscribe(self) -> None:
        old, self._pubsub = self._pubsub, feed.async_feed_redis().pubsub()
        with contextlib.suppress(Exception):  # it is broken already
            await old.aclose()
        channels = list(self._runs)
        self._unconfirmed = dict.fromkeys(channels, 1)  # the old connection's are gone
        for run in self._runs.values():
            run.resync = True
            run.ready.clear()
        await self._pubsub.subscribe(HUB_CHANNEL, *channels)

    async def _pump(self) -> None:
        pubsub = self._pubsub
        while True:
            messages = [await pubsub.get_message(timeout=None)]
            while len(messages) < DRAIN_MAX:
                message = await pubsub.get_message(timeout=0)
                if message is None:
                    break
                messages.append(message)
            self._hand_out(messages)

    def _hand_out(self, messages: list[dict[str, Any] | None]) -> None:
        by_tenant: dict[int, deque[tuple[_Run, bytes]]] = {}
        for message in messages:
            if message is None:
                continue
            kind, channel = message["type"], message["channel"]
            if kind == "subscribe" and self._confirmed(channel):
                self._ready(channel)
            elif kind == "message" and (run := self._runs.get(channel)) is not None:
                by_tenant.setdefault(run.tenant_id, deque()).append((run, message["data"]))
        queues = list(by_tenant.values())
        while queues:  # round robin: one message of each tenant in turn
            for waiting in queues:
                run, data = waiting.popleft()
                _offer(run, data)
            queues = [q for q in queues if q]

    def _confirmed(self, channel: bytes) -> bool:
        """Counts a confirmation; True when it was the channel's last outstanding one."""
        left = self._unconfirmed.get(channel, 0) - 1
        if left > 0:
            self._unconfirmed[channel] = left
            return False
        self._unconfirmed.pop(channel, None)
        return True

    def _ready(self, channel: bytes) -> None:
        run = self._runs.get(channel)
        if run is None:
            return
        run.ready.set()
        if run.resync:  # what was published meanwhile is only in storage
            run.resync = False
            for listener in list(run.listeners):
                listener.resync()


def _offer(run: _Run, data: bytes) -> None:
    header, _, lines = data.partition(b"\n")
    first, _, last = header.partition(b" ")
    batch = Batch(int(first), int(last), lines.decode())
    for listener in list(run.listeners):
        try:
            listener.offer(batch)
        except Exception:
            logger.exception("feed hub: a listener failed to take frames %s..%s", first, last)


_hubs = feed.PerLoop(FeedHub)


def hub() -> FeedHub:
    """The running event loop's hub (a web process has one loop)."""
    return _hubs.get()
