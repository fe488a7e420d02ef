"""The run feed over WebSocket (`ws/runs/<id>/?after=<seq>`; protocol in README.md).

A connection is a cursor into the run's feed: `next_seq` is the next frame it owes the
client. It starts by catching up from storage (store.aread_after), then follows the
channel layer group live. Live frames are a shortcut, never the only way to a frame:
when they are out of order (two workers publishing), arrive while the client is behind,
or the client's window of un-acknowledged frames is full, the connection drops them and
reads from storage again once the client acks. So nothing is buffered per connection
beyond one batch, and every frame reaches the client exactly once, in order.
"""

import asyncio
import json
import logging
import random
from typing import Any
from urllib.parse import parse_qs
from uuid import UUID

from channels.consumer import get_handler_name
from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings

from apps.live import viewers
from apps.live.access import FollowedRun, header, parse_after, run_for
from apps.live.feed import group_name
from apps.live.store import Frames, aread_after
from apps.tenants.middleware import SESSION_TENANT_KEY

logger = logging.getLogger(__name__)

CATCH_UP_BATCH = 256


def _resolve(scope: dict[str, Any], run_id: UUID) -> tuple[str, FollowedRun | None]:
    session = scope.get("session")
    session_tenant = session.get(SESSION_TENANT_KEY) if session is not None else None
    authorization = header(scope.get("headers", []), b"authorization")
    return run_for(authorization, scope.get("user"), session_tenant, run_id)


class RunFeedConsumer(AsyncWebsocketConsumer):
    run: FollowedRun | None = None
    keepalive: asyncio.Task[None] | None = None

    async def dispatch(self, message: dict[str, Any]) -> None:
        """Channels' dispatch first closes stale database connections through the one
        shared sync thread, for every message: at hundreds of streams that hop was the
        web process's largest cost (bench stream). This consumer touches the database only
        through database_sync_to_async, which closes its connections itself."""
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
        outcome, run = await database_sync_to_async(_resolve)(self.scope, run_id)
        if run is None:
            if outcome == "unauthorized":
                await self._refuse(4401, outcome, "sign in, or send a bearer API key (runs:read)")
            else:
                await self._refuse(4404, outcome, "no such run")
            return
        self.run = run
        self.next_seq, self.acked, self.latest_seen = after + 1, after, 0
        self.live = False
        await self.channel_layer.group_add(group_name(run.id), self.channel_name)
        await viewers.joined(run.id, self.channel_name, cancel_on_leave=run.cancels_when_left)
        self.keepalive = asyncio.create_task(self._still_here())
        hello = {"type": "hello", "run": str(run.id), "status": run.status, "after": after}
        await self.send(text_data=json.dumps(hello))
        await self._catch_up()

    async def disconnect(self, code: int) -> None:
        if self.run is None:
            return
        if self.keepalive is not None:
            self.keepalive.cancel()
        await self.channel_layer.group_discard(group_name(self.run.id), self.channel_name)
        await viewers.left(self.run.id, self.channel_name)

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
            await self._catch_up()

    async def feed_frames(self, event: dict[str, Any]) -> None:
        """A batch of frames from the channel layer (feed.APPEND_SCRIPT publishes them)."""
        frames: list[dict[str, Any]] = event["frames"]
        self.latest_seen = max(self.latest_seen, frames[-1]["seq"])
        if not self.live:
            return
        fresh = [f for f in frames if f["seq"] >= self.next_seq]
        if not fresh:
            return  # already sent from storage
        if fresh[0]["seq"] != self.next_seq or self._room() < len(fresh):
            self.live = False  # out of order, or the client is behind: storage has them
            await self._catch_up()
            return
        await self.send(text_data=json.dumps({"type": "frames", "frames": fresh}))
        self.next_seq = fresh[-1]["seq"] + 1

    def _room(self) -> int:
        return settings.SLUICE_FEED_WINDOW - (self.next_seq - 1 - self.acked)

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
            if len(frames) < want and self.latest_seen < self.next_seq:
                self.live = True  # storage has nothing newer than what the layer will bring
                return
            if not frames:
                self.live = True
                return

    async def _send_stored(self, frames: Frames) -> None:
        texts = ",".join(text for _, text in frames)
        await self.send(text_data=f'{{"type":"frames","frames":[{texts}]}}')
        self.next_seq = frames[-1][0] + 1

    async def _refuse(self, code: int, reason: str, detail: str) -> None:
        await self.send(text_data=json.dumps({"type": "error", "code": reason, "detail": detail}))
        await self.close(code=code)

    async def _still_here(self) -> None:
        assert self.run is not None
        # Spread over the interval: pages opened together must not all refresh together.
        await asyncio.sleep(random.uniform(0, viewers.VIEWER_REFRESH_S))
        while True:
            try:
                await viewers.still_here(self.run.id, self.channel_name)
            except Exception:
                logger.exception("live: could not refresh viewer of run %s", self.run.id)
            await asyncio.sleep(viewers.VIEWER_REFRESH_S)
