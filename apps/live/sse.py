"""The run feed as Server-Sent Events (`GET /api/runs/<id>/events`; README.md), for clients
and proxies that cannot hold a WebSocket. The same frames, numbered as event ids, so
`Last-Event-ID` resumes exactly after the last one received.

Each connection reads from storage after its cursor; then, caught up, it takes the frames
its process's hub offers (hub.py: one Redis subscription per run per process, shared with
the WebSocket followers), with no Redis read of its own. A gap in them, or a client too
slow to take PENDING_MAX of them (the ASGI server waits for the socket before taking the
next chunk), sends it back to storage: nothing piles up for it, and a waiting connection
holds no Redis connection.
"""

import asyncio
import json
import random
import time
from collections.abc import AsyncIterator
from uuid import UUID, uuid4

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import connection
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from django.http.response import HttpResponseBase
from django.views.decorators.http import require_GET

from apps.live import viewers
from apps.live.access import FollowedRun, parse_after, run_for
from apps.live.hub import Batch, hub
from apps.live.store import Frames, aread_after
from apps.runs.models import ACTIVE_RUN_STATUSES
from apps.tenants.middleware import SESSION_TENANT_KEY
from sluice.problems import problem

BATCH = 256
PENDING_MAX = 1024  # live frames held for a connection before it reads storage instead
RETRY_MS = 2000
# After the run's final frame, frames of steps still winding down may follow briefly.
DRAIN_AFTER_END_S = 1.0


def _resolve(request: HttpRequest, run_id: UUID) -> tuple[str, FollowedRun | None]:
    """Runs on the request's own sync thread, whose database connection Django would keep
    until the response ends: for a stream, as long as the follower stays. Closed here, so
    5,000 open streams hold no PostgreSQL connection (they held one each)."""
    try:
        session_tenant = request.session.get(SESSION_TENANT_KEY)
        return run_for(request.headers.get("Authorization"), request.user, session_tenant, run_id)
    finally:
        connection.close()


@require_GET
async def run_events(request: HttpRequest, run_id: UUID) -> HttpResponseBase:
    raw = request.headers.get("Last-Event-ID") or request.GET.get("after")
    after = parse_after(raw)
    if after is None:
        return problem(400, "Bad cursor", "Last-Event-ID / after must be a non-negative integer")
    outcome, run = await sync_to_async(_resolve)(request, run_id)
    if run is None:
        if outcome == "unauthorized":
            return problem(401, "Unauthorized", "Sign in, or send a bearer API key (runs:read).")
        return problem(404, "Not found", "No such run.")
    if run.status not in ACTIVE_RUN_STATUSES and not await aread_after(run.id, after, 1):
        # Finished and nothing after the cursor: 204 tells EventSource to stop reconnecting.
        return HttpResponse(status=204)
    response = StreamingHttpResponse(_events(run, after), content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"  # nginx and friends: do not hold the stream back
    return response


def sse_event(seq: int, text: str) -> str:
    kind = json.loads(text).get("type", "message")
    return f"id: {seq}\nevent: {kind}\ndata: {text}\n\n"


def _is_final_run_frame(text: str) -> bool:
    """The run's end, or the summary that stands for a pruned run's whole feed."""
    frame = json.loads(text)
    if frame.get("type") == "pruned":
        return True
    return frame.get("type") == "run" and frame.get("status") not in ACTIVE_RUN_STATUSES


class _Follower:
    """An SSE connection's hub listener: the live batches offered since it last took them,
    up to PENDING_MAX frames (a client too slow to take them reads storage instead)."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.pending: list[Batch] = []
        self.pending_frames = 0
        self.missed = False  # frames were dropped or missed: storage must be read

    def offer(self, batch: Batch) -> None:
        if not self.missed:
            self.pending_frames += batch.last - batch.first + 1
            if self.pending_frames > PENDING_MAX:
                self.resync()
                return
            self.pending.append(batch)
        self.event.set()

    def resync(self) -> None:
        self.pending, self.pending_frames, self.missed = [], 0, True
        self.event.set()

    def take_after(self, cursor: int) -> Frames | None:
        """The offered frames after `cursor`, in order; None when storage must be read
        instead (a gap, or frames dropped)."""
        batches, missed = self.pending, self.missed
        self.pending, self.pending_frames, self.missed = [], 0, False
        if missed:
            return None
        frames: Frames = []
        for batch in batches:
            if batch.last <= cursor:
                continue
            for seq, text in batch.frames:
                if seq <= cursor:
                    continue
                if seq != cursor + 1:
                    return None
                frames.append((seq, text))
                cursor = seq
        return frames

    async def wait(self, timeout_s: float) -> None:
        """Until frames were offered since the last wait, or the timeout."""
        if not self.event.is_set():
            try:
                async with asyncio.timeout(timeout_s):
                    await self.event.wait()
            except TimeoutError:
                pass
        self.event.clear()


async def _events(run: FollowedRun, after: int) -> AsyncIterator[str]:
    connection = f"sse.{uuid4().hex}"
    follower = _Follower()
    await hub().follow(run.tenant_id, run.id, follower)
    await viewers.joined(run.id, connection, counts=run.cancels_when_left)
    heartbeat_s = settings.SLUICE_SSE_HEARTBEAT_S
    cursor, ending_at = after, None
    # Streams opened together (a reconnect storm) keep their heartbeats apart.
    last_sent = time.monotonic() - random.uniform(0, heartbeat_s)
    from_storage = True  # subscribed: what came before is in storage, what comes after is offered
    try:
        yield f"retry: {RETRY_MS}\n\n"
        while True:
            frames = None if from_storage else follower.take_after(cursor)
            if frames is None:
                frames = await aread_after(run.id, cursor, BATCH)
                from_storage = len(frames) == BATCH  # maybe more there
            if frames:
                yield "".join(sse_event(seq, text) for seq, text in frames)
                cursor, last_sent = frames[-1][0], time.monotonic()
                if ending_at is None and any(_is_final_run_frame(t) for _, t in frames):
                    ending_at = time.monotonic() + DRAIN_AFTER_END_S
                continue
            now = time.monotonic()
            if ending_at is not None and now >= ending_at:
                return
            if now - last_sent >= heartbeat_s:
                yield ": keep-alive\n\n"
                last_sent = now
            wait = heartbeat_s - (now - last_sent)
            if ending_at is not None:
                wait = min(wait, ending_at - now)
            await follower.wait(max(wait, 0.001))
    finally:
        await viewers.left(run.id, connection)
        await hub().leave(run.tenant_id, run.id, follower)
