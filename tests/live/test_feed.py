"""The feed over WebSocket against real Redis, PostgreSQL and the channel layer: numbering,
replay after any sequence number from Redis or PostgreSQL, live delivery, reordering,
flow control, and who may follow which run."""

from typing import Any

import pytest
from asgiref.sync import async_to_sync, sync_to_async

from apps.live import feed
from apps.live.models import RunFrame
from apps.live.publisher import FEED
from apps.runs.services import cancel_run
from apps.tenants.context import tenant_context
from tests.conftest import World
from tests.live.feedkit import (
    Follower,
    bearer,
    forget_redis_tail,
    publish_tokens,
    queued_run,
    seqs,
    session_cookie,
)

pytestmark = pytest.mark.django_db(transaction=True)

WORDS = [f"w{i} " for i in range(40)]


def auth(value: str) -> list[Any]:
    return [(b"authorization", value.encode())]


def test_frames_are_numbered_stored_in_postgres_and_delivered_live(world: World) -> None:
    run = queued_run(world)
    key = bearer(world.acme)

    async def scenario() -> None:
        follower = Follower(run.id, headers=auth(key))
        hello = await follower.connect()
        assert hello == {"type": "hello", "run": str(run.id), "status": "queued", "after": 0}
        await sync_to_async(publish_tokens)(run, WORDS[:5])
        frames = await follower.receive_until_seq(5)
        assert seqs(frames) == [1, 2, 3, 4, 5]
        assert "".join(f["text"] for f in frames) == "".join(WORDS[:5])
        assert [f["offset"] for f in frames] == [0, 3, 6, 9, 12]
        await sync_to_async(cancel_run)(run, actor=world.owner)
        await sync_to_async(FEED.flush)()
        frames = await follower.receive_until_seq(6)
        assert frames[-1]["type"] == "run" and frames[-1]["status"] == "cancelled"
        await follower.disconnect()

    with tenant_context(world.acme):
        async_to_sync(scenario)()
    stored = list(RunFrame.unscoped_all_tenants.filter(run=run).order_by("seq"))
    assert [f.seq for f in stored] == [1, 2, 3, 4, 5, 6]
    assert [f.kind for f in stored] == ["tokens"] * 5 + ["run"]


@pytest.mark.parametrize("from_redis", [True, False], ids=["redis-tail", "postgres-only"])
def test_a_reconnect_after_any_seq_gets_exactly_what_followed(
    world: World, from_redis: bool
) -> None:
    run = queued_run(world)
    key = bearer(world.acme)
    publish_tokens(run, WORDS)
    if not from_redis:
        forget_redis_tail(run.id)

    async def scenario() -> None:
        for after in (0, 1, 17, 39, 40):
            follower = Follower(run.id, after=after, headers=auth(key))
            await follower.connect()
            if after < 40:
                await follower.receive_until_seq(40)
            assert await follower.nothing_more()
            assert seqs(follower.frames) == list(range(after + 1, 41))
            assert "".join(f["text"] for f in follower.frames) == "".join(WORDS[after:])
            await follower.disconnect()

    async_to_sync(scenario)()


def test_frames_published_while_catching_up_are_neither_lost_nor_repeated(world: World) -> None:
    run = queued_run(world)
    key = bearer(world.acme)
    publish_tokens(run, WORDS[:20])

    async def scenario() -> None:
        follower = Follower(run.id, after=5, headers=auth(key))
        await follower.connect()
        await sync_to_async(publish_tokens)(run, WORDS[20:], step="s2")
        await follower.receive_until_seq(40)
        assert await follower.nothing_more()
        assert seqs(follower.frames) == list(range(6, 41))
        await follower.disconnect()

    async_to_sync(scenario)()


def test_a_live_frame_ahead_of_its_predecessor_is_filled_in_from_storage(world: World) -> None:
    """Two workers publishing for one run: frame 2 may arrive before frame 1."""
    run = queued_run(world)
    key = bearer(world.acme)
    client = feed.feed_redis()
    client.set(feed.counter_key(run.id), 0)
    append = client.register_script(feed.APPEND_SCRIPT)
    keys = [feed.counter_key(run.id), feed.stream_key(run.id)]

    async def scenario() -> None:
        follower = Follower(run.id, headers=auth(key))
        await follower.connect()
        assert await follower.nothing_more()
        # Frame 1 is stored but its message goes nowhere; frame 2 is published.
        await sync_to_async(append)(keys=keys, args=["nowhere", 60, 60, 100, '{"type":"x"}'])
        channel = feed.run_channel(run.tenant_id, run.id)
        await sync_to_async(append)(keys=keys, args=[channel, 60, 60, 100, '{"type":"y"}'])
        await follower.receive_until_seq(2)
        assert [(f["seq"], f["type"]) for f in follower.frames] == [(1, "x"), (2, "y")]
        await follower.disconnect()

    async_to_sync(scenario)()


def test_a_client_that_does_not_ack_gets_one_window_then_catches_up(
    world: World, settings: Any
) -> None:
    settings.SLUICE_FEED_WINDOW = 10
    run = queued_run(world)
    key = bearer(world.acme)
    publish_tokens(run, WORDS[:25])

    async def scenario() -> None:
        follower = Follower(run.id, headers=auth(key))
        await follower.connect()
        await follower.receive_until_seq(10)
        await sync_to_async(publish_tokens)(run, WORDS[25:], step="s2")
        assert await follower.nothing_more()  # nothing beyond the window, nothing buffered
        assert seqs(follower.frames) == list(range(1, 11))
        for acked in (10, 20, 30):
            await follower.ack(acked)
            await follower.receive_until_seq(acked + 10)
        assert await follower.nothing_more()
        assert seqs(follower.frames) == list(range(1, 41))
        await follower.disconnect()

    async_to_sync(scenario)()


def test_other_tenants_and_strangers_cannot_follow_a_run(world: World) -> None:
    run = queued_run(world)
    publish_tokens(run, WORDS[:3])
    cases = [
        ([(b"origin", b"http://127.0.0.1")], 4401),  # no session, no key
        (auth("Bearer sk_nonsense_x"), 4401),
        (auth(bearer(world.acme, scopes=("graphs:read",))), 4401),  # key without runs:read
        (auth(bearer(world.globex)), 4404),  # another tenant's key: as if missing
    ]

    async def scenario() -> None:
        for headers, code in cases:
            follower = Follower(run.id, headers=headers)
            connected, _ = await follower.client.connect(5)
            assert connected
            message = await follower.receive()
            assert message["type"] == "error"
            assert await follower.closed_with() == code
            assert follower.frames == []

    async_to_sync(scenario)()


def test_a_signed_in_member_follows_with_the_session_from_our_own_origin(world: World) -> None:
    run = queued_run(world)
    publish_tokens(run, WORDS[:3])
    cookie = session_cookie(world.viewer).encode()
    outsider_cookie = session_cookie(world.outsider).encode()

    async def scenario() -> None:
        member = Follower(run.id, headers=[(b"cookie", cookie), (b"origin", b"http://127.0.0.1")])
        await member.connect()
        await member.receive_until_seq(3)
        await member.disconnect()
        # The same cookie sent from another site's page: refused before any frame.
        foreign = Follower(run.id, headers=[(b"cookie", cookie), (b"origin", b"http://evil.test")])
        connected, _ = await foreign.client.connect(5)
        assert not connected
        stranger = Follower(
            run.id, headers=[(b"cookie", outsider_cookie), (b"origin", b"http://127.0.0.1")]
        )
        await stranger.client.connect(5)
        assert (await stranger.receive())["code"] == "not_found"
        assert await stranger.closed_with() == 4404

    async_to_sync(scenario)()


def test_the_archive_keeps_the_frames_of_runs_that_still_exist(world: World) -> None:
    """A run deleted while its last frames were on their way to PostgreSQL: the batch's
    other frames are archived anyway, and a repeated batch adds nothing."""
    from uuid import uuid4

    from apps.live.publisher import FrameArchive

    run = queued_run(world)
    batches = [
        ("rows", run.tenant_id, str(run.id), 1, ["tokens", "run"], ['{"a":1}', '{"b":2}']),
        ("rows", run.tenant_id, str(uuid4()), 1, ["tokens"], ['{"c":3}']),
    ]
    FrameArchive()._write(batches)
    FrameArchive()._write(batches)
    stored = RunFrame.unscoped_all_tenants.filter(run=run).order_by("seq")
    assert [(f.seq, f.kind, f.body) for f in stored] == [
        (1, "tokens", '{"seq":1,"a":1}'),
        (2, "run", '{"seq":2,"b":2}'),
    ]
    assert RunFrame.unscoped_all_tenants.count() == 2


@pytest.mark.parametrize("after", ["-1", "abc", "²", "1.5", "9" * 19, str(2**64), "9" * 400])
def test_a_cursor_that_is_no_frame_number_is_refused(world: World, after: str) -> None:
    run = queued_run(world)
    key = bearer(world.acme)

    async def scenario() -> None:
        follower = Follower(run.id, headers=auth(key))
        follower.client.scope["query_string"] = f"after={after}".encode()
        connected, _ = await follower.client.connect(5)
        assert connected
        message = await follower.receive()
        assert message["type"] == "error" and message["code"] == "bad_request"
        assert await follower.closed_with() == 4400

    async_to_sync(scenario)()
