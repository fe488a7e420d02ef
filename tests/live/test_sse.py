"""The feed as Server-Sent Events through the real ASGI server (uvicorn): headers, event
ids and Last-Event-ID resume, keep-alive comments, the end of a finished run, and who may
read which run."""

import http.client
import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest

from apps.runs.services import cancel_run
from apps.tenants.context import tenant_context
from tests.conftest import World
from tests.harness.platform import Platform
from tests.live.feedkit import (
    bearer,
    forget_redis_tail,
    publish_tokens,
    queued_run,
    session_cookie,
)

pytestmark = pytest.mark.django_db(transaction=True)

WORDS = [f"w{i} " for i in range(40)]
HEARTBEAT_S = 0.3


@pytest.fixture(scope="module")
def web(django_db_setup: None, django_db_blocker: Any) -> Iterator[str]:
    platform = Platform("sse")
    try:
        yield platform.start_web(env={"SLUICE_SSE_HEARTBEAT_S": str(HEARTBEAT_S)})
    finally:
        platform.stop()


class EventStream:
    """A raw HTTP/1.1 SSE reader: lines as the server wrote them."""

    def __init__(self, base: str, path: str, headers: dict[str, str]) -> None:
        netloc = urlsplit(base).netloc
        self.connection = http.client.HTTPConnection(netloc, timeout=5)
        self.connection.request("GET", path, headers=headers)
        self.response = self.connection.getresponse()

    def events(self, count: int) -> list[dict[str, str]]:
        """The next `count` events (comments skipped)."""
        found: list[dict[str, str]] = []
        event: dict[str, str] = {}
        while len(found) < count:
            line = self.response.readline().decode().rstrip("\n")
            if line == "":
                if event:
                    found.append(event)
                    event = {}
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(": ")
            event[name] = value
        return found

    def next_comment(self) -> str:
        while True:
            line = self.response.readline().decode()
            if line.startswith(":"):
                return line.strip()

    def close(self) -> None:
        self.connection.close()


def test_events_carry_the_frames_with_their_seq_as_id(world: World, web: str) -> None:
    run = queued_run(world)
    key = bearer(world.acme)
    publish_tokens(run, WORDS[:10])
    stream = EventStream(web, f"/api/runs/{run.id}/events", {"Authorization": key})
    try:
        assert stream.response.status == 200
        assert stream.response.getheader("Content-Type") == "text/event-stream"
        assert stream.response.getheader("Cache-Control") == "no-cache"
        assert stream.response.getheader("X-Accel-Buffering") == "no"
        events = stream.events(11)  # the retry hint, then ten frames
        assert events[0] == {"retry": "2000"}
        frames = [json.loads(e["data"]) for e in events[1:]]
        assert [e["id"] for e in events[1:]] == [str(n) for n in range(1, 11)]
        assert {e["event"] for e in events[1:]} == {"tokens"}
        assert "".join(f["text"] for f in frames) == "".join(WORDS[:10])
        # Live: what is published next arrives on the open stream.
        publish_tokens(run, WORDS[10:12], step="s2")
        assert [e["id"] for e in stream.events(2)] == ["11", "12"]
        assert stream.next_comment() == ": keep-alive"  # quiet: a comment keeps proxies open
    finally:
        stream.close()


@pytest.mark.parametrize("from_redis", [True, False], ids=["redis-tail", "postgres-only"])
def test_last_event_id_resumes_right_after_it(world: World, web: str, from_redis: bool) -> None:
    run = queued_run(world)
    key = bearer(world.acme)
    publish_tokens(run, WORDS)
    if not from_redis:
        forget_redis_tail(run.id)
    headers = {"Authorization": key, "Last-Event-ID": "17"}
    stream = EventStream(web, f"/api/runs/{run.id}/events", headers)
    try:
        events = stream.events(24)[1:]
        assert [int(e["id"]) for e in events] == list(range(18, 41))
        assert "".join(json.loads(e["data"])["text"] for e in events) == "".join(WORDS[17:])
    finally:
        stream.close()


def test_a_finished_run_ends_the_stream_and_then_answers_no_content(world: World, web: str) -> None:
    run = queued_run(world)
    key = bearer(world.acme)
    publish_tokens(run, WORDS[:3])
    with tenant_context(world.acme):
        cancel_run(run, actor=world.owner)
    from apps.live.publisher import FEED

    FEED.flush()
    stream = EventStream(web, f"/api/runs/{run.id}/events", {"Authorization": key})
    try:
        events = stream.events(5)[1:]
        assert json.loads(events[-1]["data"])["status"] == "cancelled"
        assert events[-1]["event"] == "run"
        # The server closes the stream; only keep-alive comments came after the last frame.
        rest = stream.response.read().decode()
        assert all(line.startswith(":") for line in rest.splitlines() if line)
    finally:
        stream.close()
    # EventSource reconnects with the last id it saw: nothing follows, so 204 (stop).
    again = EventStream(
        web, f"/api/runs/{run.id}/events", {"Authorization": key, "Last-Event-ID": "4"}
    )
    assert again.response.status == 204
    again.close()


def test_only_members_and_keys_of_the_runs_tenant_may_read_it(world: World, web: str) -> None:
    run = queued_run(world)
    publish_tokens(run, WORDS[:2])
    path = f"/api/runs/{run.id}/events"

    def status(headers: dict[str, str]) -> tuple[int, str]:
        stream = EventStream(web, path, headers)
        try:
            return stream.response.status, stream.response.getheader("Content-Type") or ""
        finally:
            stream.close()

    assert status({}) == (401, "application/problem+json")
    assert status({"Authorization": "Bearer sk_nope_nope"}) == (401, "application/problem+json")
    assert status({"Authorization": bearer(world.globex)}) == (404, "application/problem+json")
    assert status({"Authorization": bearer(world.acme), "Last-Event-ID": "x"})[0] == 400
    member = {"Cookie": session_cookie(world.viewer)}
    stream = EventStream(web, path, member)
    try:
        assert stream.response.status == 200
        assert [e["id"] for e in stream.events(3)[1:]] == ["1", "2"]
    finally:
        stream.close()
    assert status({"Cookie": session_cookie(world.outsider)})[0] == 404


def test_open_streams_hold_no_database_connection(world: World, web: str) -> None:
    """A stream resolves its follower on the request's thread, then lets the database go:
    thousands of quiet followers must not use up PostgreSQL's connections."""
    from django.db import connection

    runs = [queued_run(world, slug=f"quiet{n}") for n in range(3)]
    key = bearer(world.acme)
    member = {"Cookie": session_cookie(world.viewer)}

    def backends() -> int:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            )
            return int(cursor.fetchone()[0])

    before = backends()
    streams = [
        EventStream(web, f"/api/runs/{run.id}/events", headers)
        for run in runs
        for headers in ({"Authorization": key}, member)
    ]
    try:
        for stream in streams:
            assert stream.response.status == 200
            assert stream.events(1) == [{"retry": "2000"}]  # resolved, and now waiting
        assert backends() <= before + 1  # the web process may keep one, not one each
        publish_tokens(runs[0], WORDS[:2])
        assert [e["id"] for e in streams[0].events(2)] == ["1", "2"]
    finally:
        for stream in streams:
            stream.close()


def test_a_stream_takes_offered_frames_after_its_cursor_or_goes_back_to_storage() -> None:
    """What the hub offers an SSE connection: frames after its cursor in order; a gap, or
    more than PENDING_MAX frames while the client is slow, means reading storage instead."""
    from apps.live.hub import Batch
    from apps.live.sse import PENDING_MAX, _Follower

    def batch(first: int, last: int) -> Batch:
        return Batch(first, last, "\n".join(f'{{"seq":{n}}}' for n in range(first, last + 1)))

    follower = _Follower()
    follower.offer(batch(3, 5))  # 3 and 4 were read from storage already
    follower.offer(batch(6, 6))
    assert follower.take_after(4) == [(5, '{"seq":5}'), (6, '{"seq":6}')]
    assert follower.take_after(6) == []  # nothing new
    follower.offer(batch(8, 9))  # 7 never came live
    assert follower.take_after(6) is None
    follower.offer(batch(7, 7 + PENDING_MAX))  # a client that does not keep up
    assert follower.pending == [] and follower.take_after(6) is None
    follower.offer(batch(7, 7))  # taken again once storage was read
    assert follower.take_after(6) == [(7, '{"seq":7}')]


def test_a_last_event_id_that_is_no_frame_number_is_a_400(world: World, web: str) -> None:
    run = queued_run(world)
    key = bearer(world.acme)
    for cursor in ("²", "9" * 19, str(2**64), "-3"):
        stream = EventStream(
            web, f"/api/runs/{run.id}/events", {"Authorization": key, "Last-Event-ID": cursor}
        )
        try:
            assert stream.response.status == 400, cursor
        finally:
            stream.close()
