"""The run feed as Server-Sent Events (`GET /api/runs/<id>/events`; README.md), for clients
and proxies that cannot hold a WebSocket. The same frames, numbered as event ids, so
`Last-Event-ID` resumes exactly after the last one received.

Each connection reads from storage after its cursor and, when caught up, waits to be woken
by its process's hub (hub.py: one Redis subscription per run per process, shared with the
WebSocket followers), then reads again. A slow client only slows its own reads (the ASGI
server waits for the socket before taking the next chunk), so nothing piles up for it, and
a waiting connection holds no Redis connection.
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
from apps.live.hub import hub
from apps.live.store import aread_after
from apps.runs.models import ACTIVE_RUN_STATUSES
from apps.tenants.middleware import SESSION_TENANT_KEY
from sluice.problems import problem

BATCH = 256
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


class _Wakeup:
    """An SSE connection's hub listener: frames mean "read storage again"."""

    def __init__(self) -> None:
        self.event = asyncio.Event()

    def offer(self, first: int, last: int, frames: str) -> None:
        self.event.set()

    def resync(self) -> None:
        self.event.set()

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
    wakeup = _Wakeup()
    await hub().follow(run.tenant_id, run.id, wakeup)
    await viewers.joined(run.id, connection, counts=run.cancels_when_left)
    heartbeat_s = settings.SLUICE_SSE_HEARTBEAT_S
    cursor, ending_at = after, None
    # Streams opened together (a reconnect storm) keep their heartbeats apart.
    last_sent = time.monotonic() - random.uniform(0, heartbeat_s)
    try:
        yield f"retry: {RETRY_MS}\n\n"
        while True:
            frames = await aread_after(run.id, cursor, BATCH)
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
            await wakeup.wait(max(wait, 0.001))
    finally:
        await viewers.left(run.id, connection)
        await hub().leave(run.tenant_id, run.id, wakeup)
