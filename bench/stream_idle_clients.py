"""Idle feed connections for `python -m bench stream --idle`, held by the client processes
(bench/stream_clients.py passes them the `idle_*` commands).

Each connection follows a quiet run over WebSocket (reads `hello`, then any frames, and
acks what it got, as the run page would) or SSE (bench/stream_sse.py: `200`, then events
and `: keep-alive` comments). Frames are checked for contiguous seqs as the stream
clients do. A `wake` is one step frame the parent publishes to every run: each connection
records the step frame's receipt time minus its `at` (the publisher's time), once.

Commands (JSON lines; each gets one reply):
- `{"cmd": "idle_open", "conns": [{"kind": "ws" | "sse", "run", "url", "wake_step"}],
  "headers": {...}}`: opens them, at most CONNECTS_AT_ONCE at a time; replies with how
  many are open and the first errors;
- `{"cmd": "idle_status"}`: how many are still open, closed by the server, heartbeats;
- `{"cmd": "idle_wake", "timeout_s": s}`: waits until every connection still open has its
  wake frame, or the timeout; replies with the latencies and what is missing, per kind;
- `{"cmd": "idle_close"}`: closes them all.
"""

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from bench.stream_sse import SSEResponse, open_sse

CONNECTS_AT_ONCE = 32
OPEN_TIMEOUT_S = 60.0
KINDS = ("ws", "sse")


@dataclass
class IdleConn:
    kind: str
    run: str
    url: str
    wake_step: str
    ws: ClientConnection | None = None
    sse: SSEResponse | None = None
    opened: bool = False
    closed: bool = False  # by the server, or broken: not by us
    error: str = ""
    last_seq: int = 0
    frames: int = 0
    missing: int = 0
    duplicates: int = 0
    heartbeats: int = 0
    wake_ms: float | None = None


class IdleSet:
    def __init__(self) -> None:
        self.conns: list[IdleConn] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.closing = False

    async def command(self, command: dict[str, Any]) -> dict[str, Any]:
        cmd = command["cmd"]
        if cmd == "idle_open":
            return await self.open(command["conns"], command["headers"])
        if cmd == "idle_status":
            return self.status()
        if cmd == "idle_wake":
            return await self.wake(command["timeout_s"])
        if cmd == "idle_close":
            return await self.close()
        raise ValueError(f"unknown command {cmd}")

    async def open(self, conns: list[dict[str, str]], headers: dict[str, str]) -> dict[str, Any]:
        new = [IdleConn(c["kind"], c["run"], c["url"], c["wake_step"]) for c in conns]
        self.conns.extend(new)
        gate = asyncio.Semaphore(CONNECTS_AT_ONCE)
        started = time.monotonic()
        await asyncio.gather(*(self._open(c, headers, gate) for c in new))
        failed = [c for c in new if not c.opened]
        return {
            "opened": len(new) - len(failed),
            "failed": len(failed),
            "errors": sorted({c.error for c in failed})[:3],
            "open_s": round(time.monotonic() - started, 3),
        }

    async def _open(self, c: IdleConn, headers: dict[str, str], gate: asyncio.Semaphore) -> None:
        async with gate:
            try:
                if c.kind == "ws":
                    await self._open_ws(c, headers)
                else:
                    await self._open_sse(c, headers)
            except Exception as exc:  # a figure, not a crash
                c.error = f"{type(exc).__name__}: {exc}"[:200]
                return
        c.opened = True
        follow = self._follow_ws(c) if c.kind == "ws" else self._follow_sse(c)
        self.tasks.append(asyncio.create_task(follow))

    async def _open_ws(self, c: IdleConn, headers: dict[str, str]) -> None:
        c.ws = await connect(
            c.url, additional_headers=headers, open_timeout=OPEN_TIMEOUT_S,
            ping_interval=None, proxy=None,
        )  # fmt: skip
        hello = json.loads(await asyncio.wait_for(c.ws.recv(), OPEN_TIMEOUT_S))
        if hello.get("type") != "hello":
            await c.ws.close()
            raise RuntimeError(f"expected hello, got {str(hello)[:100]}")

    async def _open_sse(self, c: IdleConn, headers: dict[str, str]) -> None:
        parts = urlsplit(c.url)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        c.sse = await open_sse(parts.hostname or "", parts.port or 80, target, headers)
        if c.sse.status != 200:
            c.sse.close()
            raise RuntimeError(f"HTTP {c.sse.status}")

    def _frame(self, c: IdleConn, frame: dict[str, Any], now: float) -> None:
        seq = int(frame["seq"])
        if seq <= c.last_seq:
            c.duplicates += 1
            return
        c.missing += seq - c.last_seq - 1
        c.last_seq = seq
        c.frames += 1
        if frame.get("type") == "step" and frame.get("step") == c.wake_step and c.wake_ms is None:
            c.wake_ms = (now - frame["at"]) * 1000

    async def _follow_ws(self, c: IdleConn) -> None:
        assert c.ws is not None
        try:
            async for message in c.ws:
                now = time.time()
                body = json.loads(message)
                if body.get("type") != "frames":
                    continue
                for frame in body["frames"]:
                    self._frame(c, frame, now)
                await c.ws.send(json.dumps({"type": "ack", "seq": c.last_seq}))
        except ConnectionClosed as exc:
            if not self.closing:
                c.error = f"closed by the server: {exc}"[:200]
        except Exception as exc:
            c.error = f"{type(exc).__name__}: {exc}"[:200]
        if not self.closing:
            c.closed = True
            c.error = c.error or "closed by the server"

    async def _follow_sse(self, c: IdleConn) -> None:
        assert c.sse is not None
        try:
            async for event in c.sse.events():
                if event.kind == "comment":
                    c.heartbeats += 1
                    continue
                frame = json.loads(event.data)
                if event.id is not None and int(event.id) != frame["seq"]:
                    c.error = f"event id {event.id} is not the frame's seq {frame['seq']}"
                self._frame(c, frame, time.time())
        except Exception as exc:
            if not self.closing:
                c.error = f"{type(exc).__name__}: {exc}"[:200]
        if not self.closing:
            c.closed = True
            c.error = c.error or "the server ended the response"

    def status(self) -> dict[str, Any]:
        opened = [c for c in self.conns if c.opened]
        return {
            "open": sum(not c.closed for c in opened),
            **{
                f"open_{kind}": sum(not c.closed for c in opened if c.kind == kind)
                for kind in KINDS
            },
            "closed_by_server": sum(c.closed for c in opened),
            "heartbeats": sum(c.heartbeats for c in opened),
            "frames": sum(c.frames for c in opened),
            "errors": sorted({c.error for c in self.conns if c.error})[:3],
        }

    async def wake(self, timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        # Connections already closed are the parent's `idle_failed`, not missing here.
        waiting = [c for c in self.conns if c.opened and not c.closed]
        while time.monotonic() < deadline and any(
            c.wake_ms is None and not c.closed for c in waiting
        ):
            await asyncio.sleep(0.05)
        out: dict[str, Any] = {}
        for kind in KINDS:
            mine = [c for c in waiting if c.kind == kind]
            out[kind] = {
                "connections": len(mine),
                "latencies_ms": [round(c.wake_ms, 3) for c in mine if c.wake_ms is not None],
                "missing": sum(c.wake_ms is None for c in mine),
                "gaps": sum(c.missing for c in mine),
                "duplicates": sum(c.duplicates for c in mine),
                "closed_during_wake": sum(c.closed for c in mine),
            }
        out["errors"] = sorted({c.error for c in self.conns if c.error})[:3]
        return out

    async def close(self) -> dict[str, Any]:
        self.closing = True
        closes = [c.ws.close() for c in self.conns if c.ws is not None]
        for c in self.conns:
            if c.sse is not None:
                c.sse.close()
        await asyncio.gather(*closes, return_exceptions=True)
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        return {"closed": len(self.conns)}
