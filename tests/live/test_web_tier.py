"""The web tier as several ASGI processes (issue 21): no web process holds the only copy of
a follower's place in a feed, its `after` does. Real uvicorn processes on real ports, real
WebSocket clients, tokens published from this process through the feed into the Redis and
PostgreSQL every web process reads: a follower moved to another process, the followers of
a process killed mid-stream, and those of a worker killed under `--workers 2` all end with
every frame of their run exactly once, in order."""

import asyncio
import concurrent.futures
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from apps.live.publisher import FEED
from apps.runs.models import Run
from apps.runs.services import cancel_run
from apps.tenants.context import tenant_context
from sluice import processes
from tests.conftest import World
from tests.harness.platform import Platform
from tests.live.feedkit import bearer, queued_run

pytestmark = pytest.mark.django_db(transaction=True)

TOKEN_EVERY_S = 0.02  # a fast model: faster than the feed's frame interval, so frames coalesce
WAIT_S = 15.0  # the longest any one step may take before the test fails saying what it awaited
LIVE_FRAMES = 20  # frames a follower gets on a connection before the test moves on


@pytest.fixture(scope="module")
def platform(django_db_setup: None, django_db_blocker: Any) -> Iterator[Platform]:
    platform = Platform("web-tier")
    try:
        yield platform
    finally:
        platform.stop()


@pytest.fixture(scope="module")
def web_b(platform: Platform) -> str:
    """The web process followers move to; it lives as long as the module."""
    return platform.start_web(name="web-b")


class Pump:
    """A model generating into each run's feed: one token per run every TOKEN_EVERY_S, from
    a thread, through this process's feed publisher, until stopped."""

    def __init__(self, runs: list[Run]) -> None:
        self.streams = {
            run.id: FEED.stream(
                tenant_id=run.tenant_id,
                run_id=run.id,
                step_id="s1",
                node="ask",
                item=None,
                attempt=1,
            )
            for run in runs
        }
        self.written: dict[UUID, list[str]] = {run.id: [] for run in runs}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="token-pump", daemon=True)

    def __enter__(self) -> "Pump":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        n = 0
        while not self._stop.wait(TOKEN_EVERY_S):
            for run_id, stream in self.streams.items():
                text = f"t{n} "
                stream.write(text, 1, time.time())
                self.written[run_id].append(text)
            n += 1

    def count(self) -> int:
        return min(len(texts) for texts in self.written.values())

    def stop(self) -> None:
        """Stops generating; returns once every token written is published and stored."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(5)
        assert not self._thread.is_alive(), "the token pump did not stop"
        for stream in self.streams.values():
            stream.close()
        assert FEED.flush(WAIT_S), "the feed did not publish the last tokens"


class Follower:
    """A WebSocket client of one run's feed that acks every batch, as a browser does, and
    keeps every frame it got across its connections."""

    def __init__(self, name: str, run: Run, key: str) -> None:
        self.name = name
        self.run_id = run.id
        self.key = key
        self.frames: list[dict[str, Any]] = []
        self.connections = 0  # connections that got their hello
        self.drops: list[float] = []  # when the server side went away (monotonic)
        self.port = 0  # the client's local port on its current connection

    @property
    def last_seq(self) -> int:
        return int(self.frames[-1]["seq"]) if self.frames else 0

    @property
    def finished(self) -> bool:
        return bool(self.frames) and self.frames[-1]["type"] == "run"

    async def follow(self, base: str, *, until: Callable[[], bool] = lambda: False) -> str:
        """One connection from `after=<last seq>`: "final" once the run's final frame came,
        "left" once `until()` holds (then the client closes), "dropped" when the server
        went away without a close frame (its process died)."""
        after = self.last_seq
        url = f"ws{base.removeprefix('http')}/ws/runs/{self.run_id}/?after={after}"
        async with connect(
            url,
            additional_headers={"Authorization": self.key},
            proxy=None,
            open_timeout=WAIT_S,
            ping_interval=None,
            close_timeout=2,
        ) as ws:
            self.port = ws.local_address[1]
            hello = json.loads(await asyncio.wait_for(ws.recv(), WAIT_S))
            assert hello["type"] == "hello", f"{self.name} on {base}: {hello}"
            assert (hello["run"], hello["after"]) == (str(self.run_id), after), hello
            self.connections += 1
            while not self.finished and not until():
                try:
                    message = json.loads(await asyncio.wait_for(ws.recv(), WAIT_S))
                    assert message["type"] == "frames", f"{self.name}: {message}"
                    self.frames.extend(message["frames"])
                    await ws.send(json.dumps({"type": "ack", "seq": self.last_seq}))
                except ConnectionClosed as closed:
                    assert closed.rcvd is None, f"{self.name}: {base} closed with {closed.rcvd}"
                    self.drops.append(time.monotonic())
                    return "dropped"
                except TimeoutError:
                    raise AssertionError(
                        f"{self.name}: nothing from {base} for {WAIT_S:.0f} s after seq "
                        f"{self.last_seq}"
                    ) from None
        return "final" if self.finished else "left"

    async def follow_to_end(self, base: str, *, then: str | None = None) -> None:
        """Follows on `base` until the run's final frame; if the server goes away, follows
        on from the last seq on `then` (or `base` again: another worker on the port)."""
        if await self.follow(base) == "dropped":
            outcome = await self.follow(then or base)
            assert outcome == "final", f"{self.name}: {outcome} again on {then or base}"


class Clients:
    """An event loop on a thread of its own for the WebSocket clients, so that this thread
    stays synchronous for Django, the feed publisher and killing processes."""

    def __enter__(self) -> "Clients":
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="ws-clients")
        self.thread.start()
        self.futures: list[concurrent.futures.Future[Any]] = []
        return self

    def start(self, coro: Coroutine[Any, Any, Any]) -> "concurrent.futures.Future[Any]":
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        self.futures.append(future)
        return future

    def wait_for(
        self, condition: Callable[[], bool], what: Callable[[], str], timeout: float = WAIT_S
    ) -> None:
        """Returns once `condition()` holds; raises a client's error as soon as one fails."""
        deadline = time.monotonic() + timeout
        while not condition():
            for future in self.futures:
                if future.done() and future.exception() is not None:
                    future.result()
            if time.monotonic() > deadline:
                raise AssertionError(f"not within {timeout:.0f} s: {what()}")
            time.sleep(0.02)

    def results(self, timeout: float = WAIT_S) -> list[Any]:
        """Every client's outcome; the first client's error is raised as is."""
        deadline = time.monotonic() + timeout
        return [f.result(max(deadline - time.monotonic(), 0.1)) for f in self.futures]

    def __exit__(self, *exc: object) -> None:
        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(cancel_all(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()


def end_runs(world: World, runs: list[Run]) -> None:
    """Each run's final frame: cancelling it publishes a `run` frame after all else."""
    with tenant_context(world.acme):
        for run in runs:
            assert cancel_run(run, actor=world.owner)
    assert FEED.flush(WAIT_S), "the feed did not publish the runs' final frames"


def assert_whole_feed(follower: Follower, written: list[str]) -> None:
    """Frames 1..N each once, in order, the last the run's own; the token frames' text is
    exactly what was written, each at the offset where the text before it ends."""
    got = [int(f["seq"]) for f in follower.frames]
    expected = list(range(1, got[-1] + 1)) if got else [1]
    missing = sorted(set(expected) - set(got))
    repeated = sorted({s for s in got if got.count(s) > 1})
    assert got == expected, (
        f"{follower.name}: seqs {got[:3]}..{got[-3:]} ({len(got)} frames), missing {missing[:10]}, "
        f"repeated {repeated[:10]}, connections {follower.connections}"
    )
    last = follower.frames[-1]
    assert (last["type"], last.get("status")) == ("run", "cancelled"), f"{follower.name}: {last}"
    tokens = [f for f in follower.frames if f["type"] == "tokens"]
    text = "".join(f["text"] for f in tokens)
    assert text == "".join(written), f"{follower.name}: text differs from what was written"
    offsets = [f["offset"] for f in tokens]
    starts = [sum(len(f["text"]) for f in tokens[:i]) for i in range(len(tokens))]
    assert offsets == starts, f"{follower.name}: offsets {offsets[:10]} vs {starts[:10]}"


def test_a_follower_moved_to_another_process_mid_stream_misses_and_repeats_nothing(
    world: World, platform: Platform, web_b: str
) -> None:
    web_a = platform.start_web(name="web-a1")
    run = queued_run(world)
    key = bearer(world.acme)
    mover, observer = Follower("mover", run, key), Follower("observer", run, key)
    with Pump([run]) as pump, Clients() as clients:
        clients.start(observer.follow(web_b))  # sees what is published, the whole time
        # On A while tokens flow; it leaves after some frames, the model goes on.
        left = clients.start(mover.follow(web_a, until=lambda: mover.last_seq >= 10))
        assert left.result(WAIT_S) == "left"
        seen = mover.last_seq
        clients.wait_for(
            lambda: observer.last_seq >= seen + LIVE_FRAMES,
            lambda: f"published while the mover was away: up to {observer.last_seq}, it saw {seen}",
        )
        # On B from where it was: what it missed, then live.
        missed_up_to = observer.last_seq
        back = clients.start(mover.follow(web_b))
        clients.wait_for(
            lambda: mover.last_seq >= missed_up_to + LIVE_FRAMES,
            lambda: f"the mover on B got up to {mover.last_seq}; {missed_up_to} were out",
        )
        pump.stop()
        end_runs(world, [run])
        assert back.result(WAIT_S) == "final"
        clients.results()
    assert mover.connections == 2 and not mover.drops
    assert_whole_feed(mover, pump.written[run.id])
    assert mover.frames == observer.frames


def test_the_followers_of_a_killed_web_process_all_resume_on_another(
    world: World, platform: Platform, web_b: str
) -> None:
    web_a = platform.start_web(name="web-a2")
    runs = [queued_run(world, slug=f"g{i}") for i in range(6)]
    key = bearer(world.acme)
    # 20 followers: one run has one, the others several.
    followers = [
        Follower(f"run{i}-f{j}", run, key)
        for i, (run, count) in enumerate(zip(runs, [1, 2, 3, 4, 5, 5], strict=True))
        for j in range(count)
    ]
    with Pump(runs) as pump, Clients() as clients:
        for follower in followers:
            clients.start(follower.follow_to_end(web_a, then=web_b))
        clients.wait_for(
            lambda: all(f.connections == 1 and f.last_seq >= LIVE_FRAMES for f in followers),
            lambda: f"followers live on A: {[f.last_seq for f in followers]}",
        )
        killed_at = time.monotonic()
        platform.kill(platform.web_procs[web_a])  # a crash: the process group, SIGKILL
        clients.wait_for(
            lambda: all(f.drops for f in followers),
            lambda: f"{sum(not f.drops for f in followers)} connections to A still open",
        )
        assert all(f.drops[0] >= killed_at for f in followers), "a connection dropped before"
        at_drop = {f.name: f.last_seq for f in followers}
        clients.wait_for(
            lambda: all(
                f.connections == 2 and f.last_seq >= at_drop[f.name] + LIVE_FRAMES
                for f in followers
            ),
            lambda: f"followers live on B: {[(f.connections, f.last_seq) for f in followers]}",
        )
        pump.stop()
        end_runs(world, runs)
        clients.results()
    for follower in followers:
        assert len(follower.drops) == 1, f"{follower.name} dropped {len(follower.drops)} times"
        assert_whole_feed(follower, pump.written[follower.run_id])
    for run in runs:
        feeds = {json.dumps(f.frames) for f in followers if f.run_id == run.id}
        assert len(feeds) == 1, f"followers of run {run.id} got different frames"


def uvicorn_workers(supervisor: int) -> set[int]:
    """The live worker processes of uvicorn's supervisor: its children that multiprocessing
    spawned (not the resource tracker it may also run)."""
    workers = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            raw = stat.read_text()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue  # gone meanwhile
        ppid = int(raw[raw.rindex(")") + 2 :].split()[1])
        pid = int(stat.parent.name)
        if ppid == supervisor and b"spawn_main" in cmdline and processes.process_alive(pid):
            workers.add(pid)
    return workers


def connection_owners(server_port: int, workers: set[int]) -> dict[int, int]:
    """Which worker holds each accepted connection to `server_port`, keyed by the client's
    port: the socket inodes of /proc/net/tcp matched against the workers' open files."""
    by_inode: dict[str, int] = {}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, inode = fields[1], fields[2], fields[9]
        if int(local.split(":")[1], 16) == server_port and inode != "0":
            by_inode[inode] = int(remote.split(":")[1], 16)
    owners = {}
    for pid in workers:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            inode = target.removeprefix("socket:[").removesuffix("]")
            if target.startswith("socket:[") and by_inode.get(inode):
                owners[by_inode[inode]] = pid
    return owners


def test_a_killed_worker_of_a_multi_worker_server_loses_no_follower(
    world: World, platform: Platform
) -> None:
    web = platform.start_web(workers=2, name="web-workers")
    supervisor = platform.web_procs[web].pid
    port = int(web.rsplit(":", 1)[1])
    runs = [queued_run(world, slug=f"g{i}") for i in range(3)]
    key = bearer(world.acme)
    followers: list[Follower] = []
    with Pump(runs) as pump, Clients() as clients:
        clients.wait_for(lambda: len(uvicorn_workers(supervisor)) == 2, lambda: "two workers")
        workers = uvicorn_workers(supervisor)

        def add_followers(count: int) -> None:
            for _ in range(count):
                follower = Follower(f"f{len(followers)}", runs[len(followers) % 3], key)
                followers.append(follower)
                clients.start(follower.follow_to_end(web))
            clients.wait_for(
                lambda: all(f.connections == 1 and f.last_seq >= 1 for f in followers),
                lambda: f"followers connected: {[f.last_seq for f in followers]}",
            )

        def held() -> dict[int, list[Follower]]:
            owners = connection_owners(port, workers)
            missing = [f.name for f in followers if f.port not in owners]
            assert not missing, f"no worker of {workers} holds the connection of {missing}"
            return {pid: [f for f in followers if owners[f.port] == pid] for pid in workers}

        # The kernel hands each connection to whichever worker accepts first: open more
        # until both hold some (or 40 are open; then killing the one holding them all
        # still tests the resume, only not that the other's followers are left alone).
        add_followers(6)
        while len(followers) < 40 and not all(held().values()):
            add_followers(2)
        holding = held()
        victim = max(workers, key=lambda pid: len(holding[pid]))
        hit, spared = holding[victim], [f for f in followers if f not in holding[victim]]
        at_kill = {f.name: f.last_seq for f in followers}
        os.kill(victim, signal.SIGKILL)

        clients.wait_for(
            lambda: all(f.drops for f in hit),
            lambda: f"{sum(not f.drops for f in hit)} of {len(hit)} on the killed worker open",
        )
        clients.wait_for(
            lambda: bool(uvicorn_workers(supervisor) - workers),
            lambda: f"a worker to replace {victim}; workers now {uvicorn_workers(supervisor)}",
        )
        assert victim not in uvicorn_workers(supervisor)
        clients.wait_for(
            lambda: all(
                f.last_seq >= at_kill[f.name] + LIVE_FRAMES
                and f.connections == (2 if f in hit else 1)
                for f in followers
            ),
            lambda: f"followers live again: {[(f.connections, f.last_seq) for f in followers]}",
        )
        pump.stop()
        end_runs(world, runs)
        clients.results()
    assert all(not f.drops for f in spared), "a follower of the surviving worker was dropped"
    assert all(len(f.drops) == 1 for f in hit)
    for follower in followers:
        assert_whole_feed(follower, pump.written[follower.run_id])
