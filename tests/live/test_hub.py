"""A web process's shared subscription (apps/live/hub.py), against real Redis: one Redis
subscription per followed run however many followers it has, gone when the last leaves,
and a lost connection to Redis delays frames but loses none."""

import asyncio
from typing import Any

import pytest
from asgiref.sync import async_to_sync, sync_to_async

from apps.live import feed
from apps.live.hub import Batch, hub
from tests.conftest import World
from tests.live.feedkit import Follower, bearer, publish_tokens, queued_run, seqs

pytestmark = pytest.mark.django_db(transaction=True)

WORDS = [f"w{i} " for i in range(30)]


def auth(value: str) -> list[Any]:
    return [(b"authorization", value.encode())]


def subscribers(channel: str) -> int:
    (_, count), *_ = feed.feed_redis().pubsub_numsub(channel)
    return int(count)


async def eventually(check: Any, timeout_s: float = 5.0) -> None:
    """Polls `check` until true: what Redis or a task does next takes its own time."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "not within the timeout"
        await asyncio.sleep(0.02)


def test_many_followers_of_a_run_share_one_subscription_until_the_last_leaves(
    world: World,
) -> None:
    run = queued_run(world)
    other = queued_run(world, slug="other")
    key = bearer(world.acme)
    channel = feed.run_channel(run.tenant_id, run.id)

    async def scenario() -> None:
        followers = [Follower(run.id, headers=auth(key)) for _ in range(12)]
        for follower in followers:
            await follower.connect()
        assert subscribers(channel) == 1
        assert hub().followed_runs() == 1
        lone = Follower(other.id, headers=auth(key))
        await lone.connect()
        assert hub().followed_runs() == 2
        await sync_to_async(publish_tokens)(run, WORDS[:6])
        for follower in followers:
            frames = await follower.receive_until_seq(6)
            assert seqs(frames) == [1, 2, 3, 4, 5, 6]
            assert "".join(f["text"] for f in frames) == "".join(WORDS[:6])
        assert await lone.nothing_more()  # another run's frames are not its
        for follower in followers[:-1]:
            await follower.disconnect()
        assert subscribers(channel) == 1  # one follower left: still subscribed
        await followers[-1].disconnect()
        await eventually(lambda: subscribers(channel) == 0)
        assert hub().followed_runs() == 1
        await lone.disconnect()

    async_to_sync(scenario)()


def test_frames_published_while_the_subscription_was_lost_arrive_from_storage(
    world: World,
) -> None:
    run = queued_run(world)
    key = bearer(world.acme)
    channel = feed.run_channel(run.tenant_id, run.id)

    async def scenario() -> None:
        follower = Follower(run.id, headers=auth(key))
        await follower.connect()
        await sync_to_async(publish_tokens)(run, WORDS[:3])
        await follower.receive_until_seq(3)
        # Redis drops the hub's connection; frames published before it subscribes again
        # reach no web process live.
        killed = feed.feed_redis().client_kill_filter(_type="pubsub")
        assert killed >= 1
        await sync_to_async(publish_tokens)(run, WORDS[3:8], step="s2")
        frames = await follower.receive_until_seq(8, timeout=10)
        assert seqs(frames) == list(range(1, 9))
        assert subscribers(channel) == 1  # subscribed again
        await sync_to_async(publish_tokens)(run, WORDS[8:10], step="s3")
        frames = await follower.receive_until_seq(10)
        assert seqs(frames) == list(range(1, 11))
        await follower.disconnect()

    async_to_sync(scenario)()


class Recorder:
    def __init__(self, order: list[tuple[str, int]], name: str) -> None:
        self.order, self.name = order, name

    def offer(self, batch: Batch) -> None:
        self.order.append((self.name, batch.first))

    def resync(self) -> None:
        raise AssertionError("not expected")


def test_messages_waiting_together_are_handed_out_round_robin_across_tenants() -> None:
    """A noisy tenant's many busy runs do not queue ahead of a quiet tenant's few."""
    from apps.live.hub import FeedHub, _Run

    order: list[tuple[str, int]] = []
    hub_ = FeedHub()
    messages: list[dict[str, Any] | None] = []
    for n in range(6):
        channel = f"noisy-{n}".encode()
        hub_._runs[channel] = _Run(1, {Recorder(order, f"noisy-{n}")})
        messages.append({"type": "message", "channel": channel, "data": b"1 1\n{}"})
    hub_._runs[b"quiet"] = _Run(2, {Recorder(order, "quiet")})
    messages += [
        {"type": "message", "channel": b"quiet", "data": f"{seq} {seq}\n{{}}".encode()}
        for seq in (1, 2)
    ]
    hub_._hand_out(messages)
    assert order == [
        ("noisy-0", 1), ("quiet", 1), ("noisy-1", 1), ("quiet", 2),
        ("noisy-2", 1), ("noisy-3", 1), ("noisy-4", 1), ("noisy-5", 1),
    ]  # fmt: skip


def test_the_publisher_orders_a_pass_round_robin_across_tenants() -> None:
    from apps.live.publisher import _round_robin_by_tenant

    runs = {f"n{i}": (1, [{"i": i}]) for i in range(4)} | {"q0": (2, []), "q1": (2, [])}
    assert [run for run, *_ in _round_robin_by_tenant(runs)] == ["q0", "n0", "q1", "n1", "n2", "n3"]


def test_a_follower_whose_subscription_is_slow_goes_on_and_resyncs_once_it_is_confirmed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Redis slow to confirm: follow() returns after SUBSCRIBE_WAIT_S (the follower reads
    storage meanwhile), and once the subscription is confirmed the follower is told to
    read storage again, for what was published before it took effect."""
    from apps.live import hub as hub_module

    monkeypatch.setattr(hub_module, "SUBSCRIBE_WAIT_S", 0.05)
    confirmed_after_s = 1.0
    real_subscribe = hub_module.FeedHub._subscribe

    async def late_subscribe(self: Any, channel: bytes, run: Any) -> None:
        run.ready.clear()

        async def later() -> None:
            await asyncio.sleep(confirmed_after_s)
            await real_subscribe(self, channel, run)

        asyncio.get_running_loop().create_task(later())

    monkeypatch.setattr(hub_module.FeedHub, "_subscribe", late_subscribe)

    class Listener:
        resyncs = 0

        def offer(self, batch: Batch) -> None:
            pass

        def resync(self) -> None:
            self.resyncs += 1

    async def scenario() -> None:
        listener = Listener()
        started = asyncio.get_running_loop().time()
        await hub().follow(1, "slow-run", listener)
        assert asyncio.get_running_loop().time() - started < confirmed_after_s  # no waiting
        assert listener.resyncs == 0
        await eventually(lambda: listener.resyncs == 1)
        assert subscribers(feed.run_channel(1, "slow-run")) == 1
        await hub().leave(1, "slow-run", listener)

    async_to_sync(scenario)()


def test_a_run_followed_again_before_its_old_subscribe_was_confirmed_waits_for_its_own() -> None:
    """Follow, leave, follow again, quickly: Redis confirms the first SUBSCRIBE before it
    has seen the UNSUBSCRIBE and the second SUBSCRIBE; only the last confirmation means the
    run is subscribed."""
    from apps.live.hub import FeedHub, _Run

    hub_ = FeedHub()
    run = hub_._runs[b"again"] = _Run(1)
    hub_._unconfirmed[b"again"] = 2  # the first SUBSCRIBE (before the leave) and this one
    hub_._hand_out([{"type": "subscribe", "channel": b"again", "data": 1}])
    assert not run.ready.is_set()
    hub_._hand_out([{"type": "unsubscribe", "channel": b"again", "data": 0}])
    assert not run.ready.is_set()
    hub_._hand_out([{"type": "subscribe", "channel": b"again", "data": 1}])
    assert run.ready.is_set()
    assert hub_._unconfirmed == {}
