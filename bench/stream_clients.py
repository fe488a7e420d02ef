"""The stream benchmark's WebSocket clients, one process of many: `python -m bench.stream_clients`.

Each client follows one run the way the run page does (static/runs/live.js, protocol in
apps/live/README.md): it reads `hello`, then `frames` messages, and acks the highest seq it
has processed 50 ms after frames arrive (one timer at a time), or at once when 64 frames
are un-acked. It measures each tokens frame's latency, `time.time()` on receipt minus the
frame's `t` (the engine's emit time of its oldest token), checks that seqs run from 1
without gaps or repeats and that offsets and the text add up to what the engine generated.
The same code follows the floor's server, which speaks the same messages.

Reconnect (only when the parent asks, for `--storm`; otherwise a close is an error): a
client has a list of URLs, its own first. When the server closes its connection or it
breaks (not when we close it), it sleeps with full-jitter exponential backoff, uniform(0,
min(2 s, 0.1 s x 2^attempt)), and connects to the next URL of its list with
`?after=<last seq received>`, as the run page resumes. Each reconnect is recorded as the
time the connection was lost, the new one's hello and its first frame. Gaps and repeats
across reconnects count as they do on one connection: seqs must stay contiguous.

Every run has a group (the parent's name for a set of clients: a web process's
followers, a tenant's); latencies and counts are reported per group, and with `timeline`
each latency comes with its receipt time.

The parent talks to this process in JSON lines: on stdin
`{"cmd": "connect", "runs": [{"id", "urls", "text", "group"?, "headers"?}], "headers": {...},
"reconnect": bool, "timeline": bool}` (reply: how many connected), `{"cmd": "finish",
"last_seq": {run: seq}, "timeout_s": s}` (wait until every client has its run's last frame,
or frames stop coming, or the timeout; close; reply with the figures), the idle feed
connections' commands (bench/stream_idle_clients.py: `idle_open`, `idle_status`,
`idle_wake`, `idle_close`) and `{"cmd": "exit"}`. Nothing else is written to stdout.
"""

import asyncio
import json
import random
import sys
import time
from array import array
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import uvloop
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from bench.stream_procs import raise_nofile

ACK_DELAY_S = 0.05  # live.js ACK_DELAY_MS
ACK_EVERY_FRAMES = 64  # live.js ACK_EVERY_FRAMES
CONNECTS_AT_ONCE = 32
OPEN_TIMEOUT_S = 60.0
IDLE_TICK_S = 0.01
QUIET_S = 10.0  # finish: a process whose clients got nothing for this long stops waiting
BACKOFF_FIRST_S = 0.1
BACKOFF_MAX_S = 2.0
RECONNECT_ATTEMPTS = 30  # then the client gives up: an error
CLOSE_WAIT_S = 5.0  # finish: reconnecting clients still busy after this are cancelled


def backoff_s(attempt: int, uniform: Any = random.uniform) -> float:
    """Full jitter: a random sleep up to an exponentially growing cap, so clients that lost
    their server together do not come back together."""
    return float(uniform(0.0, min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2**attempt)))


@dataclass
class Follower:
    run: str
    urls: list[str]
    expected: str
    headers: dict[str, str]
    group: str = ""
    url_index: int = 0
    ws: ClientConnection | None = None
    hello: bool = False
    last_seq: int = 0
    acked: int = 0
    ack_pending: bool = False
    missing: int = 0
    duplicates: int = 0
    offset_errors: int = 0
    parts: list[str] = field(default_factory=list)
    text_len: int = 0
    tokens: int = 0
    frames: int = 0
    done: bool = False
    error: str = ""
    # [lost, hello, first frame] per reconnect, epoch s (None: not reached)
    reconnects: list[list[float | None]] = field(default_factory=list)
    awaiting_first: list[float | None] | None = None


@dataclass
class Samples:
    latencies_ms: array = field(default_factory=lambda: array("d"))
    recv_at: array = field(default_factory=lambda: array("d"))


def follower(run: dict[str, Any], headers: dict[str, str]) -> Follower:
    """A run from the parent: `urls` (or one `url`), `text`, optional `group`, `headers`."""
    urls = run.get("urls") or [run["url"]]
    return Follower(run["id"], urls, run["text"], run.get("headers", headers), run.get("group", ""))


class Phase:
    """The clients of one phase: one per run."""

    def __init__(
        self,
        runs: list[dict[str, Any]],
        headers: dict[str, str],
        *,
        reconnect: bool = False,
        timeline: bool = False,
    ) -> None:
        self.followers = [follower(r, headers) for r in runs]
        self.reconnect = reconnect
        self.timeline = timeline
        self.samples: dict[str, Samples] = {f.group: Samples() for f in self.followers}
        self.first_recv: float | None = None
        self.last_recv: float | None = None
        self.acks = 0
        self.received = 0  # frames of any kind, repeats included: progress
        self.ack_queue: deque[tuple[float, Follower]] = deque()
        self.closing = False
        self.tasks: list[asyncio.Task[None]] = []
        self.acker: asyncio.Task[None] | None = None

    async def open(self) -> dict[str, Any]:
        gate = asyncio.Semaphore(CONNECTS_AT_ONCE)
        started = time.monotonic()
        await asyncio.gather(*(self._open(f, gate) for f in self.followers))
        self.acker = asyncio.create_task(self._ack_loop())
        failed = [f for f in self.followers if f.ws is None or not f.hello]
        return {
            "connected": len(self.followers) - len(failed),
            "failed": len(failed),
            "errors": sorted({f.error for f in failed})[:3],
            "connect_s": round(time.monotonic() - started, 3),
        }

    async def _connect(self, f: Follower, url: str) -> ClientConnection:
        """A connection that has said hello (or an error, which _take records)."""
        ws = await connect(
            url,
            additional_headers=f.headers,
            open_timeout=OPEN_TIMEOUT_S,
            ping_interval=None,  # a browser sends no pings
            proxy=None,
        )
        try:
            self._take(f, await asyncio.wait_for(ws.recv(), OPEN_TIMEOUT_S), time.time())
        except BaseException:
            await ws.close()
            raise
        return ws

    async def _open(self, f: Follower, gate: asyncio.Semaphore) -> None:
        async with gate:
            try:
                f.ws = await self._connect(f, f.urls[0])
            except Exception as exc:  # reported, never raised: one bad client is a figure
                f.error = f"{type(exc).__name__}: {exc}"[:200]
                return
        self.tasks.append(asyncio.create_task(self._follow(f)))

    async def _follow(self, f: Follower) -> None:
        while True:
            lost = await self._read(f)
            if self.closing or f.error:
                return
            if not self.reconnect:
                f.error = lost
                return
            if not await self._reconnect(f):
                return

    async def _read(self, f: Follower) -> str:
        """Reads until the connection ends; returns how it ended (a malformed message is
        recorded as the client's error instead)."""
        ws = f.ws
        assert ws is not None
        try:
            async for message in ws:
                now = time.time()
                self._take(f, message, now)
                if f.last_seq - f.acked >= ACK_EVERY_FRAMES:
                    await self._ack(f)
                elif f.last_seq > f.acked and not f.ack_pending:
                    f.ack_pending = True
                    self.ack_queue.append((now + ACK_DELAY_S, f))
        except ConnectionClosed as exc:
            return f"closed by the server: {exc}"[:200]
        except Exception as exc:  # a malformed message: reported, and this client stops
            f.error = f"{type(exc).__name__}: {exc}"[:200]
        return f"closed by the server: {ws.close_code} {ws.close_reason}"[:200]

    async def _reconnect(self, f: Follower) -> bool:
        """To the next URL of the follower's list, resuming after its last frame; False
        when it gave up (f.error says why) or the phase is closing."""
        record: list[float | None] = [time.time(), None, None]
        problem = ""
        for attempt in range(RECONNECT_ATTEMPTS):
            await asyncio.sleep(backoff_s(attempt))
            if self.closing:
                return False
            f.url_index = (f.url_index + 1) % len(f.urls)
            f.hello = False
            try:
                ws = await self._connect(f, f"{f.urls[f.url_index]}?after={f.last_seq}")
            except Exception as exc:
                problem = f"{type(exc).__name__}: {exc}"
                continue
            if self.closing or f.error or not f.hello:
                await ws.close()
                f.error = f.error or "no hello after reconnecting"
                return False
            record[1] = time.time()
            f.ws, f.acked = ws, f.last_seq  # the server counts un-acked frames from `after`
            f.reconnects.append(record)
            f.awaiting_first = record
            return True
        f.error = f"gave up reconnecting after {RECONNECT_ATTEMPTS} attempts: {problem}"[:200]
        return False

    def _take(self, f: Follower, message: str | bytes, now: float) -> None:
        body = json.loads(message)
        kind = body.get("type")
        if kind == "hello":
            f.hello = True
        elif kind == "frames":
            if f.awaiting_first is not None:
                f.awaiting_first[2] = now
                f.awaiting_first = None
            for frame in body["frames"]:
                self._frame(f, frame, now)
        elif kind == "error":
            f.error = f"error {body.get('code')}: {body.get('detail')}"[:200]

    def _frame(self, f: Follower, frame: dict[str, Any], now: float) -> None:
        seq = frame["seq"]
        self.received += 1
        if seq <= f.last_seq:
            f.duplicates += 1
            return
        f.missing += seq - f.last_seq - 1
        f.last_seq = seq
        if frame["type"] == "tokens":
            samples = self.samples[f.group]
            samples.latencies_ms.append((now - frame["t"]) * 1000)
            if self.timeline:
                samples.recv_at.append(now)
            text = frame["text"]
            # Offsets count UTF-16 units; the simulated engine's words are ASCII.
            if frame["offset"] != f.text_len:
                f.offset_errors += 1
            f.parts.append(text)
            f.text_len += len(text)
            f.tokens += frame["tokens"]
            f.frames += 1
            if self.first_recv is None:
                self.first_recv = now
            self.last_recv = now
        elif frame["type"] == "step" and frame.get("status") == "done":
            f.done = True

    async def _ack(self, f: Follower) -> None:
        if f.ws is None or f.last_seq <= f.acked:
            return
        seq = f.last_seq
        try:
            await f.ws.send(json.dumps({"type": "ack", "seq": seq}))
        except ConnectionClosed:
            return
        f.acked = max(f.acked, seq)
        self.acks += 1

    async def _ack_loop(self) -> None:
        """live.js's ack timers, one loop for the whole process: due times only grow."""
        while True:
            now = time.time()
            while self.ack_queue and self.ack_queue[0][0] <= now:
                _, f = self.ack_queue.popleft()
                f.ack_pending = False
                await self._ack(f)
            delay = self.ack_queue[0][0] - time.time() if self.ack_queue else IDLE_TICK_S
            await asyncio.sleep(max(delay, 0.001))

    async def finish(self, last_seq: dict[str, int], timeout_s: float) -> dict[str, Any]:
        """Waits until every client has its run's last frame, or nothing has arrived for
        QUIET_S (late frames still count; frames that stopped coming are missing), or
        `timeout_s` has passed; then closes every connection."""
        deadline = time.monotonic() + timeout_s
        seen, progress_at = self.received, time.monotonic()
        while time.monotonic() < deadline and any(
            f.ws is not None and not f.error and f.last_seq < last_seq.get(f.run, 0)
            for f in self.followers
        ):
            if self.received != seen:
                seen, progress_at = self.received, time.monotonic()
            elif time.monotonic() - progress_at > QUIET_S:
                break
            await asyncio.sleep(0.05)
        self.closing = True
        if self.acker is not None:
            self.acker.cancel()
        await asyncio.gather(
            *(f.ws.close() for f in self.followers if f.ws is not None), return_exceptions=True
        )
        if self.tasks:
            _, busy = await asyncio.wait(self.tasks, timeout=CLOSE_WAIT_S)
            for task in busy:  # still reconnecting
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)
        return self.figures(last_seq)

    def figures(self, last_seq: dict[str, int]) -> dict[str, Any]:
        groups: dict[str, dict[str, Any]] = {}
        for name, samples in self.samples.items():
            members = [f for f in self.followers if f.group == name]
            groups[name] = group_figures(members, samples, last_seq, self.timeline)
        return {
            "groups": groups,
            "acks": self.acks,
            "first_recv": self.first_recv,
            "last_recv": self.last_recv,
            "errors": sorted({f.error for f in self.followers if f.error})[:3],
        }


def group_figures(
    members: list[Follower], samples: Samples, last_seq: dict[str, int], timeline: bool
) -> dict[str, Any]:
    short = [f for f in members if f.last_seq < last_seq.get(f.run, 0)]
    out: dict[str, Any] = {
        "clients": len(members),
        "latencies_ms": [round(v, 3) for v in samples.latencies_ms],
        "frames": sum(f.frames for f in members),
        "tokens": sum(f.tokens for f in members),
        "missing": sum(f.missing for f in members)
        + sum(last_seq.get(f.run, 0) - f.last_seq for f in short),
        "duplicates": sum(f.duplicates for f in members),
        "text_mismatched": sum("".join(f.parts) != f.expected for f in members),
        "offset_errors": sum(f.offset_errors for f in members),
        "incomplete": len(short),
        "without_done": sum(not f.done for f in members),
        "errored": sum(bool(f.error) for f in members),
        "reconnects": [
            [None if t is None else round(t, 4) for t in record]
            for f in members
            for record in f.reconnects
        ],
        # Each reconnected client's first reconnect: [lost, hello, first frame], epoch s.
        "first_reconnects": [
            [None if t is None else round(t, 4) for t in f.reconnects[0]]
            for f in members
            if f.reconnects
        ],
    }
    if timeline:
        out["recv_at"] = [round(v, 4) for v in samples.recv_at]
    return out


def reply(body: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(body) + "\n")
    sys.stdout.flush()


async def serve_parent() -> None:
    from bench.stream_idle_clients import IdleSet

    raise_nofile()
    loop = asyncio.get_running_loop()
    phase: Phase | None = None
    idle: IdleSet | None = None
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            return
        command = json.loads(line)
        cmd = command["cmd"]
        if cmd == "connect":
            phase = Phase(
                command["runs"], command["headers"],
                reconnect=command.get("reconnect", False),
                timeline=command.get("timeline", False),
            )  # fmt: skip
            reply(await phase.open())
        elif cmd == "finish":
            assert phase is not None
            reply(await phase.finish(command["last_seq"], command["timeout_s"]))
            phase = None
        elif cmd.startswith("idle_"):
            idle = idle or IdleSet()
            reply(await idle.command(command))
            if cmd == "idle_close":
                idle = None
        elif cmd == "exit":
            return


if __name__ == "__main__":
    uvloop.run(serve_parent())
