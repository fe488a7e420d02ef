"""The stream benchmark's WebSocket clients, one process of many: `python -m bench.stream_clients`.

Each client follows one run the way the run page does (static/runs/live.js, protocol in
apps/live/README.md): it reads `hello`, then `frames` messages, and acks the highest seq it
has processed 50 ms after frames arrive (one timer at a time), or at once when 64 frames
are un-acked. It measures each tokens frame's latency, `time.time()` on receipt minus the
frame's `t` (the engine's emit time of its oldest token), checks that seqs run from 1
without gaps or repeats and that offsets and the text add up to what the engine generated.
The same code follows the floor's server, which speaks the same messages.

The parent talks to this process in JSON lines: on stdin
`{"cmd": "connect", "runs": [{"id", "url", "text"}], "headers": {...}}` (reply: how many
connected), `{"cmd": "finish", "last_seq": {run: seq}, "timeout_s": s}` (wait until every
client has its run's last frame, or frames stop coming, or the timeout; close; reply with
the figures) and
`{"cmd": "exit"}`. Nothing else is written to stdout.
"""

import asyncio
import json
import sys
import time
from array import array
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import uvloop
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

ACK_DELAY_S = 0.05  # live.js ACK_DELAY_MS
ACK_EVERY_FRAMES = 64  # live.js ACK_EVERY_FRAMES
CONNECTS_AT_ONCE = 32
OPEN_TIMEOUT_S = 60.0
IDLE_TICK_S = 0.01
QUIET_S = 10.0  # finish: a process whose clients got nothing for this long stops waiting


@dataclass
class Follower:
    run: str
    url: str
    expected: str
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


class Phase:
    """The clients of one phase: one per run."""

    def __init__(self, runs: list[dict[str, str]], headers: dict[str, str]) -> None:
        self.followers = [Follower(r["id"], r["url"], r["text"]) for r in runs]
        self.headers = headers
        self.latencies_ms = array("d")
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

    async def _open(self, f: Follower, gate: asyncio.Semaphore) -> None:
        async with gate:
            try:
                f.ws = await connect(
                    f.url,
                    additional_headers=self.headers,
                    open_timeout=OPEN_TIMEOUT_S,
                    ping_interval=None,  # a browser sends no pings
                    proxy=None,
                )
                self._take(f, await asyncio.wait_for(f.ws.recv(), OPEN_TIMEOUT_S), time.time())
            except Exception as exc:  # reported, never raised: one bad client is a figure
                f.error = f"{type(exc).__name__}: {exc}"[:200]
                return
        self.tasks.append(asyncio.create_task(self._follow(f)))

    async def _follow(self, f: Follower) -> None:
        assert f.ws is not None
        try:
            async for message in f.ws:
                now = time.time()
                self._take(f, message, now)
                if f.last_seq - f.acked >= ACK_EVERY_FRAMES:
                    await self._ack(f)
                elif f.last_seq > f.acked and not f.ack_pending:
                    f.ack_pending = True
                    self.ack_queue.append((now + ACK_DELAY_S, f))
        except ConnectionClosed as exc:
            if not self.closing:
                f.error = f"closed by the server: {exc}"[:200]
        except Exception as exc:  # a malformed message: reported, and this client stops
            f.error = f"{type(exc).__name__}: {exc}"[:200]
        if not self.closing and not f.error:
            f.error = f"closed by the server: {f.ws.close_code} {f.ws.close_reason}"[:200]

    def _take(self, f: Follower, message: str | bytes, now: float) -> None:
        body = json.loads(message)
        kind = body.get("type")
        if kind == "hello":
            f.hello = True
        elif kind == "frames":
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
            self.latencies_ms.append((now - frame["t"]) * 1000)
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
        await asyncio.gather(*self.tasks, return_exceptions=True)
        return self.figures(last_seq)

    def figures(self, last_seq: dict[str, int]) -> dict[str, Any]:
        short = [f for f in self.followers if f.last_seq < last_seq.get(f.run, 0)]
        return {
            "latencies_ms": [round(v, 3) for v in self.latencies_ms],
            "frames": sum(f.frames for f in self.followers),
            "tokens": sum(f.tokens for f in self.followers),
            "missing": sum(f.missing for f in self.followers)
            + sum(last_seq.get(f.run, 0) - f.last_seq for f in short),
            "duplicates": sum(f.duplicates for f in self.followers),
            "text_mismatched": sum("".join(f.parts) != f.expected for f in self.followers),
            "offset_errors": sum(f.offset_errors for f in self.followers),
            "incomplete": len(short),
            "without_done": sum(not f.done for f in self.followers),
            "acks": self.acks,
            "first_recv": self.first_recv,
            "last_recv": self.last_recv,
            "errors": sorted({f.error for f in self.followers if f.error})[:3],
            "errored": sum(bool(f.error) for f in self.followers),
        }


def reply(body: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(body) + "\n")
    sys.stdout.flush()


async def serve_parent() -> None:
    loop = asyncio.get_running_loop()
    phase: Phase | None = None
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            return
        command = json.loads(line)
        if command["cmd"] == "connect":
            phase = Phase(command["runs"], command["headers"])
            reply(await phase.open())
        elif command["cmd"] == "finish":
            assert phase is not None
            reply(await phase.finish(command["last_seq"], command["timeout_s"]))
            phase = None
        elif command["cmd"] == "exit":
            return


if __name__ == "__main__":
    uvloop.run(serve_parent())
