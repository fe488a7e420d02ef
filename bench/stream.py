"""Live token streaming to many WebSocket followers: engine emit to browser receive,
against a bare WebSocket server fed by raw Redis pub/sub.

    python -m bench stream [--quick] [--clients C] [--rate R] [--seconds D]

C clients each follow their own run over `ws/runs/<id>/` on the real ASGI server (uvicorn,
`sluice.asgi:application`, bearer API key with `runs:read`), as the run page does: hello,
frames, an ack 50 ms after frames arrive or at 64 un-acked frames (bench/stream_clients.py,
in CLIENT_PROCS processes). This process is the producer (bench/stream_producer.py): the
real SimulatedEngine generating one request per run at R tokens/s, every delta through the
real publisher (apps.live.publisher.FEED: coalescing, numbering, Redis stream, channel
layer, PostgreSQL archive). The runs exist (start_run) and stay queued: no Celery worker
runs, the feed does not care.

The floor runs in the same invocation, phases interleaved with ours (ours, floor, ours,
floor, after one unmeasured warm-up phase of each): the same engine, prompts and
coalescing, frames numbered by the producer and PUBLISHed on raw Redis pub/sub to a bare
WebSocket server (bench/stream_floor.py) that forwards each message to its run's client.
The same client code measures both sides.

Each phase: fresh runs, C clients connect and get their hello; each run gets its step's
`running` frame (for ours the run's first frame; its counter was started when the run
was), then every run generates N = R x D tokens at once on
one engine (TTFT 100 ms), then the step's `done` frame. Latency is per tokens frame: the
client's `time.time()` on receipt minus the frame's `t`, the engine's emit time of its
oldest token. After the engine's last token clients wait for what is still on its way
(until they have every run's last frame, or nothing arrives for 10 s): late frames count,
with their latency. `dropped_or_duplicated` counts frames that never arrived (seq gaps, and
the frames between a client's last one and its run's last seq), frames repeated, and runs
whose text is not exactly what the engine generated. `tokens_per_s_total` is the tokens
clients received over the measured phases' time from the engine's first token to the last
frame received (plus one token interval per phase: N tokens are N - 1 intervals apart).
"""

import asyncio
import json
import os
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.inference_kit import keep_logs, llm_spec, pct, rounded
from bench.stack import services
from bench.stream_procs import (
    cpu_seconds,
    hear,
    start_asgi,
    start_clients,
    start_floor,
    stop_processes,
    tell,
)

TTFT_MS = 100.0
CLIENT_PROCS = 2
SIDES = ("ours", "floor")
MEASURED = ("ours", "floor", "ours", "floor")
WARM_UP_S = 2.0
FINISH_TIMEOUT_S = 300.0  # clients stop waiting sooner once frames stop coming
FLUSH_TIMEOUT_S = 120.0
TARGET_P99_MS = 100.0
SIZES = {"quick": (200, 20.0, 10.0), "full": (500, 20.0, 20.0)}  # clients, tokens/s, seconds


@dataclass
class Stack:
    root: Path
    asgi: subprocess.Popen[bytes]
    asgi_port: int
    floor: subprocess.Popen[bytes]
    floor_port: int
    clients: list[subprocess.Popen[bytes]]
    bearer: str
    tenant: Any
    version: Any
    floor_publisher: Any
    cpu_pids: dict[str, list[int]] = field(default_factory=dict)


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
    announce_ms: float = 0.0  # publishing every run's step-running frame
    cpu_s: dict[str, float] = field(default_factory=dict)
    cpu_wall_s: float = 0.0


def cpu_groups(stack: Stack) -> dict[str, list[int]]:
    from sluice import embedded

    redis_pid = (stack.root / "redis" / "redis.pid").read_text().strip()
    postmaster = embedded.postmaster_pid(stack.root / "pg")
    return {
        "producer": [os.getpid()],
        "asgi": [stack.asgi.pid],
        "floor_server": [stack.floor.pid],
        "clients": [p.pid for p in stack.clients],
        "redis": [int(redis_pid)],
        "postgres": [postmaster] if postmaster else [],
    }


# --- setup --------------------------------------------------------------------------------


def make_jobs(stack: Stack, side: str, prompts: list[tuple[str, str]]) -> list[Any]:
    """One job per client: for ours a new run (queued, never executed), for the floor an id."""
    from apps.runs.services import start_run
    from apps.tenants.context import tenant_context
    from bench.stream_producer import Job

    jobs = []
    with tenant_context(stack.tenant):
        for n, (prompt, text) in enumerate(prompts):
            if side == "ours":
                run = start_run(version=stack.version, payload={"q": f"s{n}"}, actor="bench")
                run_id = str(run.id)
            else:
                run_id = str(uuid.uuid4())
            jobs.append(Job(stack.tenant.id, run_id, str(uuid.uuid4()), prompt, text))
    return jobs


def bearer_and_graph(tokens: int) -> tuple[Any, str, Any]:
    from apps.graphs.services import create_graph
    from apps.tenants.api_keys import create_api_key
    from apps.tenants.context import tenant_context
    from apps.tenants.keys import RUNS_READ
    from apps.tenants.services import create_tenant

    tenant = create_tenant(slug="bench", name="Bench", actor="bench")
    _, secret = create_api_key(tenant=tenant, name="stream", scopes=[RUNS_READ], actor="bench")
    with tenant_context(tenant):
        graph = create_graph(slug="stream", name="Stream", spec=llm_spec(tokens), actor="bench")
        version = graph.live_version()
    return tenant, secret, version


# --- one phase ----------------------------------------------------------------------------


def connect(stack: Stack, side: str, jobs: list[Any]) -> list[list[Any]]:
    """Every job's client connects (spread over the client processes); returns each
    process's share of the jobs and what each process said."""
    port = stack.asgi_port if side == "ours" else stack.floor_port
    headers = {"Authorization": f"Bearer {stack.bearer}"} if side == "ours" else {}
    shares = [jobs[n :: len(stack.clients)] for n in range(len(stack.clients))]
    for proc, share in zip(stack.clients, shares, strict=True):
        runs = [
            {"id": j.run_id, "url": f"ws://127.0.0.1:{port}/ws/runs/{j.run_id}/", "text": j.text}
            for j in share
        ]
        tell(proc, {"cmd": "connect", "runs": runs, "headers": headers})
    return shares


def last_seqs(stack: Stack, side: str, jobs: list[Any]) -> dict[str, int]:
    """Each run's last frame number, once everything is published."""
    from apps.live import feed

    if side == "floor":
        return {j.run_id: stack.floor_publisher.last_seq.get(j.run_id, 0) for j in jobs}
    counters = feed.feed_redis().mget([feed.counter_key(j.run_id) for j in jobs])
    return {j.run_id: int(c or 0) for j, c in zip(jobs, counters, strict=True)}


def run_phase(
    stack: Stack, side: str, jobs: list[Any], *, rate: float, tokens: int, measured: bool
) -> PhaseResult:
    from apps.live.publisher import FEED
    from bench.stream_producer import announce, generate

    shares = connect(stack, side, jobs)
    opened = [hear(proc) for proc in stack.clients]
    publisher = FEED if side == "ours" else stack.floor_publisher
    started = time.monotonic()
    announce(jobs, publisher, "running")
    if not publisher.flush(FLUSH_TIMEOUT_S):
        raise RuntimeError(f"{side}: the running frames were not published in time")
    announce_ms = (time.monotonic() - started) * 1000

    before, cpu_started = cpu_seconds(stack.cpu_pids), time.monotonic()
    generated = asyncio.run(
        generate(jobs, publisher, rate=rate, ttft_s=TTFT_MS / 1000, tokens=tokens)
    )
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
    return result


def phase_result(
    side: str, measured: bool, opened: list[dict[str, Any]], got: list[dict[str, Any]], gen: Any
) -> PhaseResult:
    """What the client processes reported, added up."""
    last_recv = max((g["last_recv"] for g in got if g["last_recv"]), default=gen.last_at)
    return PhaseResult(
        side=side,
        measured=measured,
        latencies_ms=[v for g in got for v in g["latencies_ms"]],
        tokens_emitted=gen.tokens,
        tokens=sum(g["tokens"] for g in got),
        frames=sum(g["frames"] for g in got),
        missing=sum(g["missing"] for g in got),
        duplicates=sum(g["duplicates"] for g in got),
        text_mismatched=sum(g["text_mismatched"] for g in got),
        offset_errors=sum(g["offset_errors"] for g in got),
        incomplete=sum(g["incomplete"] for g in got),
        errored=sum(g["errored"] for g in got) + sum(o["failed"] for o in opened),
        errors=sorted({e for g in [*opened, *got] for e in g["errors"]})[:5],
        acks=sum(g["acks"] for g in got),
        connect_s=max(o["connect_s"] for o in opened),
        duration_s=last_recv - gen.first_at,
        drain_s=last_recv - gen.last_at,
        engine_s=gen.last_at - gen.first_at,
    )


# --- figures ------------------------------------------------------------------------------


def side_figures(phases: list[PhaseResult], rate: float) -> dict[str, Any]:
    latencies = [v for p in phases for v in p.latencies_ms]
    tokens = sum(p.tokens for p in phases)
    emitted = sum(p.tokens_emitted for p in phases)
    # A run's N tokens are N - 1 decode steps apart: each phase counts one step more.
    duration = sum(p.duration_s + 1 / rate for p in phases)
    engine_s = sum(p.engine_s + 1 / rate for p in phases)
    wall = sum(p.cpu_wall_s for p in phases)
    missing = sum(p.missing for p in phases)
    duplicates = sum(p.duplicates for p in phases)
    mismatched = sum(p.text_mismatched for p in phases)
    figures: dict[str, Any] = {
        "frames": sum(p.frames for p in phases),
        "tokens": tokens,
        "tokens_emitted": emitted,
        "tokens_per_s_total": rounded(tokens / duration if duration > 0 else None, 1),
        # Below tokens_per_s_offered when the producer's engine loop fell behind.
        "engine_tokens_per_s": rounded(emitted / engine_s if engine_s > 0 else None, 1),
        "latency_ms_p50": rounded(pct(latencies, 0.5)),
        "latency_ms_p99": rounded(pct(latencies, 0.99)),
        "latency_ms_max": rounded(max(latencies, default=None)),
        "latency_ms_p99_by_phase": [rounded(pct(p.latencies_ms, 0.99)) for p in phases],
        "dropped_or_duplicated": missing + duplicates + mismatched,
        "missing_frames": missing,
        "duplicate_frames": duplicates,
        "text_mismatched_runs": mismatched,
        "offset_errors": sum(p.offset_errors for p in phases),
        "incomplete_runs": sum(p.incomplete for p in phases),
        "clients_with_errors": sum(p.errored for p in phases),
        "errors": sorted({e for p in phases for e in p.errors})[:5],
        "acks": sum(p.acks for p in phases),
        "drain_s_max": rounded(max((p.drain_s for p in phases), default=None)),
        "connect_s_max": rounded(max((p.connect_s for p in phases), default=None)),
        "running_frames_flush_ms_max": rounded(max((p.announce_ms for p in phases), default=None)),
    }
    for name in phases[0].cpu_s if phases else {}:
        used = sum(p.cpu_s[name] for p in phases)
        figures[f"cpu_cores_{name}"] = rounded(used / wall if wall > 0 else None)
    return figures


def figures(phases: list[PhaseResult], clients: int, rate: float, tokens: int) -> dict[str, Any]:
    ours = side_figures([p for p in phases if p.measured and p.side == "ours"], rate)
    floor = side_figures([p for p in phases if p.measured and p.side == "floor"], rate)
    p99, floor_p99 = ours["latency_ms_p99"], floor["latency_ms_p99"]
    result: dict[str, Any] = {
        "bench": "stream",
        "clients": clients,
        "tokens_per_s_total": ours["tokens_per_s_total"],
        "latency_ms_p50": ours["latency_ms_p50"],
        "latency_ms_p99": p99,
        "floor_latency_ms_p99": floor_p99,
        "ratio_vs_floor_p99": round(p99 / floor_p99, 3) if p99 and floor_p99 else None,
        "dropped_or_duplicated": ours["dropped_or_duplicated"],
        "floor_dropped_or_duplicated": floor["dropped_or_duplicated"],
        "target_latency_ms_p99": TARGET_P99_MS,
        "tokens_per_s_per_client": rate,
        "tokens_per_s_offered": clients * rate,
        "tokens_per_run": tokens,
        "ttft_ms": TTFT_MS,
        "client_processes": CLIENT_PROCS,
        "phases": [p.side for p in phases if p.measured],
    }
    for key, value in ours.items():
        result.setdefault(key, value)
    for key, value in floor.items():
        result[f"floor_{key}"] = value
    return result


def fmt(value: Any) -> str:
    return "-" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def print_table(result: dict[str, Any], phases: list[PhaseResult]) -> None:
    print(
        f"{result['clients']} WebSocket clients, each following its own run at"
        f" {fmt(result['tokens_per_s_per_client'])} tokens/s ({result['tokens_per_run']} tokens,"
        f" TTFT {TTFT_MS:.0f} ms); {result['client_processes']} client processes;"
        " latency = client receive - engine emit of the frame's oldest token"
    )
    print(
        f"{'phase':<8}{'frames':>8}{'tokens':>9}{'tok/s':>9}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'max ms':>9}{'lost/dup':>9}{'errors':>7}{'drain s':>8}{'connect s':>10}"
        f"{'running ms':>11}"
    )
    for p in phases:
        label = p.side if p.measured else f"{p.side}*"
        rate = p.tokens / (p.duration_s + 1 / result["tokens_per_s_per_client"])
        print(
            f"{label:<8}{p.frames:>8}{p.tokens:>9}{rate:>9.0f}"
            f"{fmt(rounded(pct(p.latencies_ms, 0.5))):>9}"
            f"{fmt(rounded(pct(p.latencies_ms, 0.99))):>9}"
            f"{fmt(rounded(max(p.latencies_ms, default=None))):>9}"
            f"{p.missing + p.duplicates + p.text_mismatched:>9}{p.errored:>7}"
            f"{p.drain_s:>8.1f}{p.connect_s:>10.1f}{p.announce_ms:>11.0f}"
        )
    print(
        "(* warm-up, not counted; 'drain s': the engine's last token to the last frame"
        " received; 'running ms': publishing every run's step-running frame)"
    )
    names = [k.removeprefix("cpu_cores_") for k in result if k.startswith("cpu_cores_")]
    print("CPU cores used, engine start to clients done: " + ", ".join(names))
    for side, prefix in (("ours", ""), ("floor", "floor_")):
        cores = [fmt(result[f"{prefix}cpu_cores_{name}"]) for name in names]
        print(f"  {side:<6}" + "".join(f"{c:>8}" for c in cores))
    print(
        f"ours p50 {fmt(result['latency_ms_p50'])} ms, p99 {fmt(result['latency_ms_p99'])} ms;"
        f" floor p50 {fmt(result['floor_latency_ms_p50'])} ms,"
        f" p99 {fmt(result['floor_latency_ms_p99'])} ms; ratio p99"
        f" {fmt(result['ratio_vs_floor_p99'])}; tokens/s {fmt(result['tokens_per_s_total'])}"
        f" of {fmt(result['tokens_per_s_offered'])} offered"
    )
    print(
        f"target: latency p99 ≤ {TARGET_P99_MS:.0f} ms (measured {fmt(result['latency_ms_p99'])}),"
        f" dropped_or_duplicated = 0 (measured {result['dropped_or_duplicated']};"
        f" floor {result['floor_dropped_or_duplicated']})"
    )
    for error in result["errors"] + result["floor_errors"]:
        print(f"  client error: {error}")
    if result["asgi_log_errors"]:
        print(f"the ASGI server logged {result['asgi_log_errors']} errors (see asgi.log)")


# --- main ---------------------------------------------------------------------------------


def logged_errors(log: Path) -> int:
    """ERROR lines the ASGI server logged, Django's and uvicorn's own (each with its
    traceback after it)."""
    text = log.read_text(errors="replace") if log.exists() else ""
    return sum(" ERROR " in line or line.startswith("ERROR:") for line in text.splitlines())


def sizes(
    quick: bool, clients: int | None, rate: float | None, seconds: float | None
) -> tuple[int, float, int]:
    c, r, d = SIZES["quick" if quick else "full"]
    c = c if clients is None else clients
    r = r if rate is None else rate
    d = d if seconds is None else seconds
    return c, r, max(1, round(r * d))


def main(
    *,
    quick: bool,
    clients: int | None = None,
    rate: float | None = None,
    seconds: float | None = None,
) -> int:
    count, rate_, tokens = sizes(quick, clients, rate, seconds)
    if count < 1 or rate_ <= 0 or (seconds is not None and seconds <= 0):
        print("stream: --clients must be at least 1, --rate and --seconds above 0")
        return 2
    warm_tokens = max(1, round(rate_ * WARM_UP_S))
    phases: list[PhaseResult] = []
    with services("stream") as root:
        from bench.stream_producer import FloorPublisher, full_length_prompts

        prompts = full_length_prompts(count, tokens, "stream")
        warm_prompts = full_length_prompts(count, warm_tokens, "warm")
        tenant, secret, version = bearer_and_graph(tokens)
        procs: list[subprocess.Popen[bytes]] = []
        try:
            asgi, asgi_port = start_asgi(root)
            procs.append(asgi)
            floor, floor_port = start_floor(root)
            procs.append(floor)
            client_procs = start_clients(root, CLIENT_PROCS)
            procs.extend(client_procs)
            stack = Stack(
                root, asgi, asgi_port, floor, floor_port, client_procs, secret, tenant,
                version, FloorPublisher(os.environ["REDIS_URL"]),
            )  # fmt: skip
            stack.cpu_pids = cpu_groups(stack)
            plan = [(side, warm_prompts, warm_tokens, False) for side in SIDES]
            plan += [(side, prompts, tokens, True) for side in MEASURED]
            jobs = [make_jobs(stack, side, p) for side, p, _, _ in plan]
            for (side, _, n, measured), side_jobs in zip(plan, jobs, strict=True):
                phases.append(
                    run_phase(stack, side, side_jobs, rate=rate_, tokens=n, measured=measured)
                )
        finally:
            stop_processes(procs)
            logs = keep_logs(root)
            asgi_errors = logged_errors(root / "asgi.log")
    result = figures(phases, count, rate_, tokens)
    result["asgi_log_errors"] = asgi_errors
    print_table(result, phases)
    print(f"logs: {logs}")
    print("RESULT " + json.dumps(result))
    return 0 if result["dropped_or_duplicated"] == 0 else 1
