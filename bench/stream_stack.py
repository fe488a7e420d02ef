"""What the stream benchmark's modes share (bench/stream.py): the processes of one
invocation, the tenants and runs the clients follow, and one phase (clients connect, the
producer generates, clients report), added up per group of clients."""

import asyncio
import contextlib
import os
import subprocess
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.stream_procs import (
    cpu_seconds,
    hear,
    start_clients,
    start_floor,
    start_web,
    stop_processes,
    tell,
)

CLIENT_PROCS = 2
FINISH_TIMEOUT_S = 300.0  # clients stop waiting sooner once frames stop coming
FLUSH_TIMEOUT_S = 120.0


@dataclass
class BenchTenant:
    tenant: Any
    bearer: str
    version: Any

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.bearer}"}


@dataclass
class Stack:
    root: Path
    web: list[subprocess.Popen[bytes]]
    web_ports: list[int]
    clients: list[subprocess.Popen[bytes]]
    floor: subprocess.Popen[bytes] | None = None
    floor_port: int = 0
    floor_publisher: Any = None
    cpu_pids: dict[str, list[int]] = field(default_factory=dict)

    def ws_url(self, web: int, run_id: str) -> str:
        return f"ws://127.0.0.1:{self.web_ports[web]}/ws/runs/{run_id}/"

    def floor_url(self, run_id: str) -> str:
        return f"ws://127.0.0.1:{self.floor_port}/ws/runs/{run_id}/"


@dataclass
class Follow:
    """How one job's client follows it: its URLs (its own server first, the others to
    reconnect to), its group and its request headers."""

    urls: list[str]
    group: str
    headers: dict[str, str]


@dataclass
class PhaseResult:
    side: str
    measured: bool
    latencies_ms: list[float]
    tokens_emitted: int
    tokens: int
    frames: int
    missing: int
    duplicates: int
    text_mismatched: int
    offset_errors: int
    incomplete: int
    errored: int
    errors: list[str]
    acks: int
    connect_s: float
    duration_s: float
    drain_s: float  # the engine's last token to the last frame received
    engine_s: float  # the engine's first token to its last
    engine_first_at: float = 0.0  # epoch s
    engine_last_at: float = 0.0
    groups: dict[str, dict[str, Any]] = field(default_factory=dict)  # merged over processes
    announce_ms: float = 0.0  # publishing every run's step-running frame
    cpu_s: dict[str, float] = field(default_factory=dict)  # engine start to clients done
    cpu_wall_s: float = 0.0
    cpu_start: dict[str, float] = field(default_factory=dict)  # CPU seconds at engine start
    cpu_started: float = 0.0  # time.monotonic() then
    extra: dict[str, Any] = field(default_factory=dict)  # what a mode's `during` returned


# --- setup --------------------------------------------------------------------------------


@contextlib.contextmanager
def running_stack(root: Path, *, web: int, floor: bool) -> Iterator[Stack]:
    """`web` uvicorn processes, the floor server if asked, CLIENT_PROCS client processes;
    all stopped on the way out."""
    from bench.stream_producer import FloorPublisher

    procs: list[subprocess.Popen[bytes]] = []
    try:
        servers = start_web(root, web)
        procs.extend(proc for proc, _ in servers)
        stack = Stack(root, [p for p, _ in servers], [port for _, port in servers], [])
        if floor:
            stack.floor, stack.floor_port = start_floor(root)
            procs.append(stack.floor)
            stack.floor_publisher = FloorPublisher(os.environ["REDIS_URL"])
        stack.clients = start_clients(root, CLIENT_PROCS)
        procs.extend(stack.clients)
        stack.cpu_pids = cpu_groups(stack)
        yield stack
    finally:
        stop_processes(procs)


def cpu_groups(stack: Stack, *, web_apart: bool = False) -> dict[str, list[int]]:
    """CPU accounting groups: the web processes together as "asgi" (or one group each,
    "asgi_0", "asgi_1", ..., with `web_apart`)."""
    from sluice import embedded

    redis_pid = (stack.root / "redis" / "redis.pid").read_text().strip()
    postmaster = embedded.postmaster_pid(stack.root / "pg")
    web = (
        {f"asgi_{n}": [proc.pid] for n, proc in enumerate(stack.web)}
        if web_apart
        else {"asgi": [proc.pid for proc in stack.web]}
    )
    groups = {"producer": [os.getpid()], **web}
    if stack.floor is not None:
        groups["floor_server"] = [stack.floor.pid]
    return {
        **groups,
        "clients": [p.pid for p in stack.clients],
        "redis": [int(redis_pid)],
        "postgres": [postmaster] if postmaster else [],
    }


def bearer_and_graph(tokens: int, slug: str = "bench") -> BenchTenant:
    """A tenant with an API key (runs:read) and a graph whose runs the clients follow."""
    from apps.graphs.services import create_graph
    from apps.tenants.api_keys import create_api_key
    from apps.tenants.context import tenant_context
    from apps.tenants.keys import RUNS_READ
    from apps.tenants.services import create_tenant
    from bench.inference_kit import llm_spec

    tenant = create_tenant(slug=slug, name=slug.title(), actor="bench")
    _, secret = create_api_key(tenant=tenant, name="stream", scopes=[RUNS_READ], actor="bench")
    with tenant_context(tenant):
        graph = create_graph(slug="stream", name="Stream", spec=llm_spec(tokens), actor="bench")
        version = graph.live_version()
    return BenchTenant(tenant, secret, version)


def make_jobs(who: BenchTenant, side: str, prompts: list[tuple[str, str]]) -> list[Any]:
    """One job per client: for ours a new run (queued, never executed), for the floor an id."""
    from apps.runs.services import start_run
    from apps.tenants.context import tenant_context
    from bench.stream_producer import Job

    jobs = []
    with tenant_context(who.tenant):
        for n, (prompt, text) in enumerate(prompts):
            if side == "ours":
                run = start_run(version=who.version, payload={"q": f"s{n}"}, actor="bench")
                run_id = str(run.id)
            else:
                run_id = str(uuid.uuid4())
            jobs.append(Job(who.tenant.id, run_id, str(uuid.uuid4()), prompt, text))
    return jobs


def spread(stack: Stack, jobs: list[Any], group: str, headers: dict[str, str]) -> list[Follow]:
    """Job n's client on web process n mod W (round robin), the others after it in order."""
    count = len(stack.web_ports)
    return [
        Follow([stack.ws_url((n + k) % count, job.run_id) for k in range(count)], group, headers)
        for n, job in enumerate(jobs)
    ]


def on_floor(stack: Stack, jobs: list[Any]) -> list[Follow]:
    return [Follow([stack.floor_url(job.run_id)], "floor", {}) for job in jobs]


# --- one phase ----------------------------------------------------------------------------


def connect(
    stack: Stack, jobs: list[Any], follows: list[Follow], *, reconnect: bool, timeline: bool
) -> list[list[Any]]:
    """Every job's client connects (spread over the client processes); returns each
    process's share of the jobs."""
    procs = len(stack.clients)
    shares = [jobs[n::procs] for n in range(procs)]
    for n, (proc, share) in enumerate(zip(stack.clients, shares, strict=True)):
        runs = [
            {"id": j.run_id, "urls": f.urls, "text": j.text, "group": f.group, "headers": f.headers}
            for j, f in zip(share, follows[n::procs], strict=True)
        ]
        command = {"runs": runs, "headers": {}, "reconnect": reconnect, "timeline": timeline}
        tell(proc, {"cmd": "connect", **command})
    return shares


def last_seqs(stack: Stack, side: str, jobs: list[Any]) -> dict[str, int]:
    """Each run's last frame number, once everything is published."""
    from apps.live import feed

    if side == "floor":
        return {j.run_id: stack.floor_publisher.last_seq.get(j.run_id, 0) for j in jobs}
    counters = feed.feed_redis().mget([feed.counter_key(j.run_id) for j in jobs])
    return {j.run_id: int(c or 0) for j, c in zip(jobs, counters, strict=True)}


During = Callable[[], Coroutine[Any, Any, dict[str, Any]]]


def run_phase(
    stack: Stack,
    side: str,
    jobs: list[Any],
    follows: list[Follow],
    *,
    rate: float,
    tokens: int,
    ttft_ms: float,
    measured: bool,
    reconnect: bool = False,
    timeline: bool = False,
    during: During | None = None,
) -> PhaseResult:
    """Clients connect and say hello; each run gets its step's running frame; every run
    generates `tokens` at `rate` on one engine (with `during`, if given, running beside it
    in the same loop: the storm's kill); the done frames; clients get what is left."""
    from apps.live.publisher import FEED
    from bench.stream_producer import announce, generate

    shares = connect(stack, jobs, follows, reconnect=reconnect, timeline=timeline)
    opened = [hear(proc) for proc in stack.clients]
    publisher = FEED if side == "ours" else stack.floor_publisher
    started = time.monotonic()
    announce(jobs, publisher, "running")
    if not publisher.flush(FLUSH_TIMEOUT_S):
        raise RuntimeError(f"{side}: the running frames were not published in time")
    announce_ms = (time.monotonic() - started) * 1000

    async def produce() -> tuple[Any, dict[str, Any]]:
        beside = asyncio.create_task(during()) if during is not None else None
        gen = await generate(jobs, publisher, rate=rate, ttft_s=ttft_ms / 1000, tokens=tokens)
        return gen, (await beside if beside is not None else {})

    before, cpu_started = cpu_seconds(stack.cpu_pids), time.monotonic()
    generated, extra = asyncio.run(produce())
    if not publisher.flush(FLUSH_TIMEOUT_S):
        raise RuntimeError(f"{side}: frames were not published in time")
    last_seq = last_seqs(stack, side, jobs)
    for proc, share in zip(stack.clients, shares, strict=True):
        mine = {j.run_id: last_seq[j.run_id] for j in share}
        tell(proc, {"cmd": "finish", "last_seq": mine, "timeout_s": FINISH_TIMEOUT_S})
    got = [hear(proc) for proc in stack.clients]
    after, cpu_wall = cpu_seconds(stack.cpu_pids), time.monotonic() - cpu_started
    result = phase_result(side, measured, opened, got, generated)
    result.announce_ms = announce_ms
    result.cpu_s = {k: after[k] - before[k] for k in after}
    result.cpu_wall_s = cpu_wall
    result.cpu_start, result.cpu_started = before, cpu_started
    result.extra = extra
    return result


COUNTS = (
    "clients", "frames", "tokens", "missing", "duplicates", "text_mismatched", "offset_errors",
    "incomplete", "without_done", "errored",
)  # fmt: skip


def merge_groups(got: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each group's figures over the client processes: counts added, lists joined."""
    merged: dict[str, dict[str, Any]] = {}
    for reply in got:
        for name, figures in reply["groups"].items():
            into = merged.setdefault(name, {})
            for key, value in figures.items():
                if isinstance(value, list):
                    into.setdefault(key, []).extend(value)
                else:
                    into[key] = into.get(key, 0) + value
    return merged


def phase_result(
    side: str, measured: bool, opened: list[dict[str, Any]], got: list[dict[str, Any]], gen: Any
) -> PhaseResult:
    """What the client processes reported, added up."""
    groups = merge_groups(got)
    last_recv = max((g["last_recv"] for g in got if g["last_recv"]), default=gen.last_at)

    def total(key: str) -> int:
        return sum(int(g.get(key, 0)) for g in groups.values())

    return PhaseResult(
        side=side,
        measured=measured,
        latencies_ms=[v for g in groups.values() for v in g.get("latencies_ms", [])],
        tokens_emitted=gen.tokens,
        tokens=total("tokens"),
        frames=total("frames"),
        missing=total("missing"),
        duplicates=total("duplicates"),
        text_mismatched=total("text_mismatched"),
        offset_errors=total("offset_errors"),
        incomplete=total("incomplete"),
        errored=total("errored") + sum(o["failed"] for o in opened),
        errors=sorted({e for g in [*opened, *got] for e in g["errors"]})[:5],
        acks=sum(g["acks"] for g in got),
        connect_s=max(o["connect_s"] for o in opened),
        duration_s=last_recv - gen.first_at,
        drain_s=last_recv - gen.last_at,
        engine_s=gen.last_at - gen.first_at,
        engine_first_at=gen.first_at,
        engine_last_at=gen.last_at,
        groups=groups,
    )


def logged_errors(root: Path) -> int:
    """ERROR lines the web processes logged, Django's and uvicorn's own (each with its
    traceback after it)."""
    count = 0
    for log in root.glob("asgi*.log"):
        text = log.read_text(errors="replace")
        count += sum(" ERROR " in line or line.startswith("ERROR:") for line in text.splitlines())
    return count
