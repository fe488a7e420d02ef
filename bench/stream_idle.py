"""`python -m bench stream --idle [N]`: what N idle live viewers cost one web process.

    python -m bench stream --idle [N] [--quick]

One web process (uvicorn, `sluice.processes.asgi_argv`). N feed connections (default 5000,
1000 with --quick), half WebSocket (`ws/runs/<id>/`, hello, then nothing to read) and
half SSE (`GET /api/runs/<id>/events?after=0`: `200`, `retry:`, then `: keep-alive`
every SLUICE_SSE_HEARTBEAT_S), to N/5 quiet runs (queued, made with start_run as the
default mode makes them; no frames while they wait), 5 viewers each, bearer API key.
They are opened from the client processes (bench/stream_idle_clients.py; the SSE client is
bench/stream_sse.py), at most 32 at a time per process. Every process inherits this one's
open-file limit, raised to its hard limit first (`nofile_limit` in the RESULT; 20000 here,
enough for 5000: the web process holds a socket per connection and its Redis pool).

Memory: the web process's resident set (VmRSS, with its children if any) after a warm-up
(20 connections opened and closed), once all N are open, after SETTLE_S (10 s) and after
the hold; `mb_per_connection` is (after settling - before) / connections open then. CPU:
over a HOLD_S (20 s) hold with nothing to send, the web process's cores
(`web_cpu_cores_idle`: heartbeats, pings, viewer bookkeeping, SSE's blocking reads), and
the others'. `idle_failed`: connections that did not open or that the server closed
before the wake. `postgres_connections_before`/`_held`: PostgreSQL client connections
(all processes but this one) before and once settled: an idle viewer should hold none.

Wake: then one step frame is published to every run (apps.live.publisher.FEED.frame, as
bench/stream_producer.announce does) and every open connection must receive it:
`wake_latency_ms_p50`/`_p99` (receipt minus the frame's `at`, the publisher's time; by
kind too) and `wake_missing` (connections open at the wake that did not get it within
WAKE_TIMEOUT_S; `wake_closed_during_wake`: those the server closed meanwhile).

There is no floor: the baseline is the same process before the connections. Exit status 1
when a connection failed or missed the wake frame, or frames arrived out of order.
"""

import json
import math
import time
from typing import Any

from bench.inference_kit import keep_logs, pct, rounded
from bench.stack import services
from bench.stream_procs import cpu_seconds, hear, raise_nofile, rss_mb, tell
from bench.stream_stack import (
    FLUSH_TIMEOUT_S,
    Stack,
    bearer_and_graph,
    logged_errors,
    make_jobs,
    running_stack,
)

VIEWERS_PER_RUN = 5
SIZES = {"quick": 1000, "full": 5000}
WARM_CONNECTIONS = 20
SETTLE_S = 10.0
HOLD_S = 20.0
WAKE_TIMEOUT_S = 60.0


def connections(stack: Stack, jobs: list[Any], count: int) -> list[dict[str, str]]:
    """`count` connections, VIEWERS_PER_RUN per run, WebSocket and SSE alternating."""
    port = stack.web_ports[0]
    out = []
    for n in range(count):
        job = jobs[n // VIEWERS_PER_RUN]
        kind = "ws" if n % 2 == 0 else "sse"
        url = (
            stack.ws_url(0, job.run_id)
            if kind == "ws"
            else f"http://127.0.0.1:{port}/api/runs/{job.run_id}/events?after=0"
        )
        out.append({"kind": kind, "run": job.run_id, "url": url, "wake_step": job.step_id})
    return out


def ask_all(stack: Stack, command: dict[str, Any], parts: list[Any] | None = None) -> list[Any]:
    """The same command to every client process (with its part, if given), then each reply."""
    for n, proc in enumerate(stack.clients):
        tell(proc, {**command, **({"conns": parts[n]} if parts is not None else {})})
    return [hear(proc) for proc in stack.clients]


def open_all(stack: Stack, conns: list[dict[str, str]], headers: dict[str, str]) -> dict[str, Any]:
    procs = len(stack.clients)
    replies = ask_all(
        stack, {"cmd": "idle_open", "headers": headers}, [conns[n::procs] for n in range(procs)]
    )
    return {
        "opened": sum(r["opened"] for r in replies),
        "failed": sum(r["failed"] for r in replies),
        "errors": sorted({e for r in replies for e in r["errors"]})[:5],
        "open_s": max(r["open_s"] for r in replies),
    }


def status(stack: Stack) -> dict[str, Any]:
    replies = ask_all(stack, {"cmd": "idle_status"})
    keys = ("open", "open_ws", "open_sse", "closed_by_server", "heartbeats", "frames")
    out: dict[str, Any] = {k: sum(r[k] for r in replies) for k in keys}
    out["errors"] = sorted({e for r in replies for e in r["errors"]})[:5]
    return out


def wake(stack: Stack, jobs: list[Any]) -> dict[str, Any]:
    """One step frame to every run; what the connections got."""
    from apps.live.publisher import FEED
    from bench.stream_producer import announce

    started = time.monotonic()
    announce(jobs, FEED, "running")
    if not FEED.flush(FLUSH_TIMEOUT_S):
        raise RuntimeError("idle: the wake frames were not published in time")
    publish_ms = (time.monotonic() - started) * 1000
    replies = ask_all(stack, {"cmd": "idle_wake", "timeout_s": WAKE_TIMEOUT_S})
    out: dict[str, Any] = {"wake_publish_ms": rounded(publish_ms)}
    every: list[float] = []
    for kind in ("ws", "sse"):
        latencies = [v for r in replies for v in r[kind]["latencies_ms"]]
        every += latencies
        out[f"wake_latency_ms_p99_{kind}"] = rounded(pct(latencies, 0.99))
        for key in ("missing", "gaps", "duplicates", "closed_during_wake"):
            out[f"wake_{key}_{kind}"] = sum(r[kind][key] for r in replies)
    out["wake_latency_ms_p50"] = rounded(pct(every, 0.5))
    out["wake_latency_ms_p99"] = rounded(pct(every, 0.99))
    out["wake_latency_ms_max"] = rounded(max(every, default=None))
    out["wake_received"] = len(every)
    for key in ("missing", "gaps", "duplicates", "closed_during_wake"):
        out[f"wake_{key}"] = out[f"wake_{key}_ws"] + out[f"wake_{key}_sse"]
    out["wake_errors"] = sorted({e for r in replies for e in r["errors"]})[:5]
    return out


def postgres_clients() -> int:
    """PostgreSQL client connections open now, other than this process's own."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
        )
        row = cursor.fetchone()
    return int(row[0]) if row else 0


def measure(
    stack: Stack, jobs: list[Any], warm_jobs: list[Any], headers: dict[str, str], n: int
) -> dict[str, Any]:
    """The idle sequence on a running stack; returns its figures."""
    web = [stack.web[0].pid]
    open_all(stack, connections(stack, warm_jobs, WARM_CONNECTIONS), headers)
    time.sleep(1.0)
    ask_all(stack, {"cmd": "idle_close"})
    time.sleep(2.0)
    figures: dict[str, Any] = {
        "web_rss_mb_before": rounded(rss_mb(web), 1),
        "postgres_connections_before": postgres_clients(),
    }
    opened = open_all(stack, connections(stack, jobs, n), headers)
    figures["web_rss_mb_connected"] = rounded(rss_mb(web), 1)
    time.sleep(SETTLE_S)
    settled = status(stack)
    figures["web_rss_mb"] = rounded(rss_mb(web), 1)
    figures["postgres_connections_held"] = postgres_clients()
    per = (figures["web_rss_mb"] - figures["web_rss_mb_before"]) / max(settled["open"], 1)
    figures["mb_per_connection"] = rounded(per, 4)
    cpu, started = cpu_seconds(stack.cpu_pids), time.monotonic()
    time.sleep(HOLD_S)
    used, held_s = cpu_seconds(stack.cpu_pids), time.monotonic() - started
    held = status(stack)
    figures["web_rss_mb_held"] = rounded(rss_mb(web), 1)
    for name in used:
        cores = (used[name] - cpu[name]) / held_s
        figures["web_cpu_cores_idle" if name == "asgi" else f"cpu_cores_idle_{name}"] = rounded(
            cores, 3
        )
    figures.update(
        {
            "idle_connections": held["open"],
            "idle_connections_ws": held["open_ws"],
            "idle_connections_sse": held["open_sse"],
            "idle_failed": n - held["open"],
            "idle_open_failed": opened["failed"],
            "idle_closed_by_server": held["closed_by_server"],
            "open_s": opened["open_s"],
            "connections_opened_per_s": rounded(opened["opened"] / opened["open_s"], 1)
            if opened["open_s"]
            else None,
            "hold_s": rounded(held_s),
            "sse_heartbeats_in_hold": held["heartbeats"] - settled["heartbeats"],
            "frames_before_wake": held["frames"],
            "errors": sorted({*opened["errors"], *held["errors"]})[:5],
        }
    )
    figures.update(wake(stack, jobs))
    ask_all(stack, {"cmd": "idle_close"})
    return figures


def print_table(result: dict[str, Any]) -> None:
    n = result["connections_asked"]
    print(
        f"idle: {n} feed connections (half WebSocket, half SSE) to {result['runs']} quiet"
        f" runs, {VIEWERS_PER_RUN} viewers each, on one web process"
    )
    print(
        f"opened {n - result['idle_open_failed']} of {n} in {fmt(result['open_s'])} s;"
        f" held {result['idle_connections']} ({result['idle_connections_ws']} WebSocket,"
        f" {result['idle_connections_sse']} SSE) after {fmt(result['hold_s'])} s"
        f" ({result['idle_closed_by_server']} closed by the server)"
    )
    print(f"{'web RSS MiB':<22}{'before':>10}{'connected':>11}{'settled':>10}{'held':>10}")
    print(
        f"{'':<22}{fmt(result['web_rss_mb_before']):>10}{fmt(result['web_rss_mb_connected']):>11}"
        f"{fmt(result['web_rss_mb']):>10}{fmt(result['web_rss_mb_held']):>10}"
        f"   -> {fmt(result['mb_per_connection'])} MiB per connection"
    )
    print(
        f"PostgreSQL client connections: {result['postgres_connections_before']} before,"
        f" {result['postgres_connections_held']} with the connections open"
    )
    others = ", ".join(
        f"{k.removeprefix('cpu_cores_idle_')} {fmt(v)}"
        for k, v in result.items()
        if k.startswith("cpu_cores_idle_")
    )
    print(
        f"CPU cores over the {fmt(result['hold_s'])} s hold:"
        f" web {fmt(result['web_cpu_cores_idle'])};"
        f" {others}; SSE heartbeats received {result['sse_heartbeats_in_hold']}"
    )
    print(
        f"wake: one step frame to each run (published in {fmt(result['wake_publish_ms'])} ms):"
        f" received by {result['wake_received']}, missing {result['wake_missing']}"
        f" ({result['wake_closed_during_wake']} closed meanwhile);"
        f" latency p50 {fmt(result['wake_latency_ms_p50'])} ms, p99"
        f" {fmt(result['wake_latency_ms_p99'])} ms (WebSocket"
        f" {fmt(result['wake_latency_ms_p99_ws'])}, SSE {fmt(result['wake_latency_ms_p99_sse'])}),"
        f" max {fmt(result['wake_latency_ms_max'])} ms"
    )
    for error in sorted({*result["errors"], *result["wake_errors"]}):
        print(f"  client error: {error}")


def fmt(value: Any) -> str:
    return "-" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def main(*, quick: bool, connections: int | None) -> int:
    n = connections or SIZES["quick" if quick else "full"]
    if n < 2:
        print("stream --idle: N must be at least 2 (half WebSocket, half SSE)")
        return 2
    runs = math.ceil(n / VIEWERS_PER_RUN)
    nofile = raise_nofile()
    with services("stream-idle") as root:
        who = bearer_and_graph(1)
        jobs = make_jobs(who, "ours", [("idle", "")] * runs)
        warm_jobs = make_jobs(who, "ours", [("warm", "")] * (WARM_CONNECTIONS // VIEWERS_PER_RUN))
        try:
            with running_stack(root, web=1, floor=False) as stack:
                result = measure(stack, jobs, warm_jobs, who.headers, n)
        finally:
            logs = keep_logs(root)
            asgi_errors = logged_errors(root)
    result = {
        "bench": "stream",
        "mode": "idle",
        "web_processes": 1,
        "connections_asked": n,
        "runs": runs,
        "nofile_limit": nofile,
        **result,
        "asgi_log_errors": asgi_errors,
    }
    print_table(result)
    print(f"logs: {logs}")
    print("RESULT " + json.dumps(result))
    failed = result["idle_failed"] or result["wake_missing"]
    return 1 if failed or result["wake_gaps"] or result["wake_duplicates"] else 0
