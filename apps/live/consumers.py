"""The run feed over WebSocket (`ws/runs/<id>/?after=<seq>`; protocol in README.md).

A connection is a cursor into the run's feed: `next_seq` is the next frame it owes the
client. It starts by catching up from storage (store.aread_after), then takes live frames
from its process's hub (hub.py: one Redis subscription per run per process). Live frames
are a shortcut, never the only way to a frame: when they are out of order (two workers
publishing), arrive while the client is behind, or the client's window of un-acknowledged
frames is full, the connection drops them and reads from storage again once the client
acks. So nothing is buffered per connection beyond what arrived since its last send, and
every frame reaches the client exactly once, in order.

Sending is done by one task per connection that exists only while there is something to
send (`_pump`): live batches that arrived together go out as one message, as they came
from Redis (never parsed here), and an idle connection costs no task at all.
"""

import asyncio
import json
import logging
from typing import Any
from urllib.parse import parse_qs
from uuid import UUID, uuid4

from asgiref.sync import sync_to_async
from channels.consumer import get_handler_name
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings
from django.db import connection

from apps.live import viewers
from apps.live.access import FollowedRun, header, parse_after, run_for
from apps.live.hub import Batch, hub
from apps.live.store import Frames, aread_after
from apps.tenants.middleware import SESSION_TENANT_KEY

logger = logging.getLogger(__name__)

CATCH_UP_BATCH = 256


def _resolve(scope: dict[str, Any], run_id: UUID) -> tuple[str, FollowedRun | None]:
    """On any executor thread, not Channels' one database thread: followers reconnecting
    together (a web process died) are authenticated side by side, not one after another.
    The thread keeps no connection afterwards."""
    try:
        session = scope.get("session")
        session_tenant = session.get(SESSION_TENANT_KEY) if session is not None else None
        authorization = header(scope.get("headers", []), b"authorization")
        return run_for(authorization, scope.get("user"), session_tenant, run_id)
    finally:
        connection.close()


def _frames_message(parts: list[str]) -> str:
    return '{"type":"frames","frames":[' + ",".join(parts) + "]}"


class RunFeedConsumer(AsyncWebsocketConsumer):
    run: FollowedRun | None = None
    started = False  # hello sent: frames may go out
    live = False  # caught up: live frames are sent as they come
    next_seq = 1
    acked = 0
    latest_seen = 0  # the highest seq heard live, sent or not
    pending: list[Batch] | None = None  # live batches not yet sent
    sender: asyncio.Task[None] | None = None
    viewer_id = ""

    async def dispatch(self, message: dict[str, Any]) -> None:
        """Channels' dispatch first closes stale database connections through the one
        shared sync thread, for every message: at hundreds of streams that hop was the
        web process's largest cost (bench stream). This consumer touches the database only
        in _resolve, which closes its connection itself."""
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"no handler for message type {message['type']}")
        await handler(message)

    async def connect(self) -> None:
        await self.accept()
        run_id: UUID = self.scope["url_route"]["kwargs"]["run_id"]
        query = parse_qs(self.scope.get("query_string", b"").decode())
        after = parse_after(query.get("after", [""])[0])
        if after is None:
            await self._refuse(4400, "bad_request", "after must be a non-negative integer")
            return
        outcome, run = await sync_to_async(_resolve, thread_sensitive=False)(self.scope, run_id)
        if run is None:
            if outcome == "unauthorized":
                await self._refuse(4401, outcome, "sign in, or send a bearer API key (runs:read)")
            else:
                await self._refuse(4404, outcome, "no such run")
            return
        self.run = run
        self.next_seq, self.acked = after + 1, after
        # Subscribed before the first read of storage: nothing published after it is missed.
        await hub().follow(run.tenant_id, run.id, self)
        self.viewer_id = f"ws.{uuid4().hex}"
        await viewers.joined(run.id, self.viewer_id, counts=run.cancels_when_left)
        hello = {"type": "hello", "run": str(run.id), "status": run.status, "after": after}
        await self.send(text_data=json.dumps(hello))
        self.started = True
        self._wake()

    async def disconnect(self, code: int) -> None:
        if self.run is None:
            return
        self.started = False
        if self.sender is not None:
            self.sender.cancel()
        await hub().leave(self.run.tenant_id, self.run.id, self)
        await viewers.left(self.run.id, self.viewer_id)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if self.run is None or text_data is None:
            return
        try:
            message = json.loads(text_data)
            acked = int(message["seq"]) if message.get("type") == "ack" else None
        except (ValueError, TypeError, KeyError, AttributeError):
            return  # not ours to answer: only acks are expected
        if acked is None:
            return
        self.acked = max(self.acked, min(acked, self.next_seq - 1))
        if not self.live:
            self._wake()

    # -- from the hub (on the event loop; never blocks) -----------------------------------

    def offer(self, batch: Batch) -> None:
        self.latest_seen = max(self.latest_seen, batch.last)
        if not self.live or batch.last < self.next_seq:
            return  # storage has them; or already sent from storage
        if self.pending is None:
            self.pending = []
        self.pending.append(batch)
        self._wake()

    def resync(self) -> None:
        self.live, self.pending = False, None
        self._wake()

    # -- sending -----------------------------------------------------------------------

    def _wake(self) -> None:
        if self.started and self.sender is None:
            self.sender = asyncio.create_task(self._pump())

    async def _pump(self) -> None:
        try:
            while self.started:
                if not self.live:
                    await self._catch_up()
                    if not self.live:
                        return  # waiting for the client's ack
                if not self.pending:
                    return
                batches, self.pending = self.pending, None
                if not await self._send_live(batches):
                    self.live, self.pending = False, None  # storage has them
        except Exception:
            logger.exception("live: feed of run %s stopped", self.run.id if self.run else None)
            await self.close(code=1011)
        finally:
            self.sender = None

    async def _send_live(self, batches: list[Batch]) -> bool:
        """Sends the batches that follow next_seq as one message; False when one does not
        follow on, or the client's window has no room for them."""
        parts, expected = [], self.next_seq
        for batch in batches:
            if batch.last < expected:
                continue
            if batch.first != expected:
                return False
            parts.append(batch.array_items)
            expected = batch.last + 1
        if not parts:
            return True
        if expected - self.next_seq > self._room():
            return False
        await self.send(text_data=_frames_message(parts))
        self.next_seq = expected
        return True

    def _room(self) -> int:
        return int(settings.SLUICE_FEED_WINDOW) - (self.next_seq - 1 - self.acked)

    async def _catch_up(self) -> None:
        assert self.run is not None
        while True:
            want = min(self._room(), CATCH_UP_BATCH)
            if want <= 0:
                self.live = False  # wait for the client's ack
                return
            frames = await aread_after(self.run.id, self.next_seq - 1, want)
            if frames:
                await self._send_stored(frames)
            if not frames or (len(frames) < want and self.latest_seen < self.next_seq):
                # Storage has nothing newer than what the hub will bring.
                self.live, self.pending = True, None
                return

    async def _send_stored(self, frames: Frames) -> None:
        await self.send(text_data=_frames_message([text for _, text in frames]))
        self.next_seq = frames[-1][0] + 1

    async def _refuse(self, code: int, reason: str, detail: str) -> None:
        await self.send(text_data=json.dumps({"type": "error", "code": reason, "detail": detail}))
        await self.close(code=code)
