"""Helpers for feed tests: runs to follow, keys to follow them with, and a WebSocket client
(Channels' communicator over the real ASGI application, channel layer and Redis)."""

import json
import time
from typing import Any
from uuid import UUID

from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.test import Client

from apps.live import feed
from apps.live.publisher import FEED
from apps.runs.models import Run
from apps.runs.services import start_run
from apps.tenants.api_keys import create_api_key
from apps.tenants.context import tenant_context
from apps.tenants.keys import RUNS_READ
from apps.tenants.models import Tenant
from sluice.asgi import application
from tests.conftest import World

FRAME_S = settings.SLUICE_FEED_FRAME_MS / 1000 + 0.005

ONE_STEP: dict[str, Any] = {
    "nodes": [
        {"id": "in", "type": "source.manual", "config": {"example": {"x": 1}}},
        {"id": "t", "type": "transform.template", "config": {"template": "{{ x }}"}},
    ],
    "edges": [["in", "t"]],
}


def queued_run(
    world: World, spec: dict[str, Any] | None = None, slug: str = "g", payload: Any = None
) -> Run:
    graph = world.graph(slug, spec or ONE_STEP)
    with tenant_context(world.acme):
        version = graph.versions.get()
        return start_run(version=version, payload=payload or {"x": 1}, actor=world.owner)


def bearer(tenant: Tenant, scopes: tuple[str, ...] = (RUNS_READ,)) -> str:
    _, secret = create_api_key(tenant=tenant, name="feed", scopes=list(scopes), actor="test")
    return f"Bearer {secret}"


def session_cookie(user: AbstractBaseUser) -> str:
    """A signed-in browser's session cookie (World's passwords are "pw-<name>")."""
    browser = Client()
    name = user.get_username()
    assert browser.login(username=name, password=f"pw-{name}")
    return f"sessionid={browser.cookies['sessionid'].value}"


def publish_tokens(run: Run, texts: list[str], *, step: str = "s1", attempt: int = 1) -> None:
    stream = FEED.stream(
        tenant_id=run.tenant_id, run_id=run.id, step_id=step, node="ask", item=None,
        attempt=attempt,
    )  # fmt: skip
    for text in texts:
        stream.write(text, 1, 0.0)
        FEED.flush()
        time.sleep(FRAME_S)  # one frame per write: the next one is past the coalescing interval
    stream.close()
    assert FEED.flush()


def forget_redis_tail(run_id: UUID) -> None:
    """What Redis loses when a run's tail expires: only PostgreSQL is left."""
    feed.feed_redis().delete(feed.stream_key(run_id))


class Follower:
    """A WebSocket client of one run's feed. Async: a test runs one scenario coroutine
    (`async_to_sync(scenario)()`), since the application lives on that scenario's loop."""

    def __init__(self, run_id: object, *, after: int = 0, headers: list[Any] | None = None):
        path = f"/ws/runs/{run_id}/" + (f"?after={after}" if after else "")
        self.client = WebsocketCommunicator(application, path, headers=headers or [])
        self.frames: list[dict[str, Any]] = []

    async def connect(self) -> dict[str, Any]:
        connected, _ = await self.client.connect(5)
        assert connected
        return await self.receive()

    async def receive(self, timeout: float = 5) -> dict[str, Any]:
        message: dict[str, Any] = json.loads(await self.client.receive_from(timeout))
        if message["type"] == "frames":
            self.frames.extend(message["frames"])
        return message

    async def receive_until_seq(self, seq: int, timeout: float = 5) -> list[dict[str, Any]]:
        while not self.frames or self.frames[-1]["seq"] < seq:
            await self.receive(timeout)
        return self.frames

    async def nothing_more(self, timeout: float = 0.3) -> bool:
        return bool(await self.client.receive_nothing(timeout))

    async def ack(self, seq: int) -> None:
        await self.client.send_to(json.dumps({"type": "ack", "seq": seq}))

    async def closed_with(self, timeout: float = 5) -> int:
        output = await self.client.receive_output(timeout)
        while output["type"] != "websocket.close":
            output = await self.client.receive_output(timeout)
        return int(output.get("code", 1000))

    async def disconnect(self) -> None:
        await self.client.disconnect()


def seqs(frames: list[dict[str, Any]]) -> list[int]:
    return [f["seq"] for f in frames]
