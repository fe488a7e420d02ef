"""Live token streaming to many followers: engine emit to browser receive, against a bare
WebSocket server fed by raw Redis pub/sub; and the same feed under a web process's crash,
with thousands of idle viewers, and with a noisy neighbour (issue 21).

    python -m bench stream [--quick] [--clients C] [--rate R] [--seconds D] [--web W]
    python -m bench stream --storm [--quick] [--clients V] [--rate R] [--seconds D]
    python -m bench stream --idle [N] [--quick]
    python -m bench stream --noisy [--quick] [--clients C] [--rate R] [--seconds D] [--web W]

Default mode (this module). C clients each follow their own run over `ws/runs/<id>/` on
the real web tier: W separate uvicorn processes (`sluice.processes.asgi_argv`, default
W = 2, the core count here, as `make run` starts SLUICE_WEB_PROCESSES of them), each on
its own port, as replicas behind a load balancer; client n connects to process n mod W.
Clients authenticate with a bearer API key (`runs:read`) and behave as the run page does:
hello, frames, an ack 50 ms after frames arrive or at 64 un-acked frames
(bench/stream_clients.py, in CLIENT_PROCS processes). This process is the producer
(bench/stream_producer.py): the real SimulatedEngine generating one request per run at R
tokens/s, every delta through the real publisher (apps.live.publisher.FEED: coalescing,
numbering, Redis stream, channel layer, PostgreSQL archive). The runs exist (start_run)
and stay queued: no Celery worker runs, the feed does not care.

The floor runs in the same invocation, phases interleaved with ours (ours, floor, ours,
floor, after one unmeasured warm-up phase of each): the same engine, prompts and
coalescing, frames numbered by the producer and PUBLISHed on raw Redis pub/sub to one bare
WebSocket server process (bench/stream_floor.py, without permessage-deflate, as the real
server now runs) that forwards each message to its run's client. The same client code
measures both sides.

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
CPU: "asgi" is all the web processes together.

Targets (issue 21), printed as met or missed: latency p99 at most 2.5 x the floor's p99
in the same run, dropped_or_duplicated 0, tokens_per_s_total at least 98% of offered.
The ratio means something only while the floor keeps up: the table says whether the
floor delivered 98% of what was offered; when it did not, the machine is saturated at
that size and the comparison is inconclusive. Exit status 1 when frames were lost or
repeated.

The other modes: `--storm` (bench/stream_storm.py: kill one of two web processes while
its followers stream; they reconnect to the other), `--idle` (bench/stream_idle.py: N idle
WebSocket and SSE viewers on one web process: memory, heartbeat CPU, one wake-up frame)
and `--noisy` (bench/stream_noisy.py: a quiet tenant's latency alone and beside a tenant
with nine times its runs). Each prints a table and, last, `RESULT {json}` with
`"bench": "stream"` and its `"mode"`.
"""

import json
from typing import Any

from bench.inference_kit import keep_logs, pct, rounded
from bench.stack import services
from bench.stream_procs import raise_nofile
from bench.stream_stack import (
    CLIENT_PROCS,
    PhaseResult,
    bearer_and_graph,
    logged_errors,
    make_jobs,
    on_floor,
    run_phase,
    running_stack,
    spread,
)

TTFT_MS = 100.0
SIDES = ("ours", "floor")
MEASURED = ("ours", "floor", "ours", "floor")
WARM_UP_S = 2.0
WEB_PROCS = 2  # the core count here, as `make run`'s SLUICE_WEB_PROCESSES default
TARGET_RATIO_P99 = 2.5  # ours p99 at most this times the floor's, in the same run
TARGET_THROUGHPUT = 0.98  # tokens/s delivered, of offered
SIZES = {"quick": (200, 20.0, 10.0), "full": (500, 20.0, 20.0)}  # clients, tokens/s, seconds


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


def share(part: float | None, whole: float) -> float | None:
    return None if part is None or whole <= 0 else part / whole


def figures(
    phases: list[PhaseResult], clients: int, rate: float, tokens: int, web: int
) -> dict[str, Any]:
    ours = side_figures([p for p in phases if p.measured and p.side == "ours"], rate)
    floor = side_figures([p for p in phases if p.measured and p.side == "floor"], rate)
    p99, floor_p99 = ours["latency_ms_p99"], floor["latency_ms_p99"]
    offered = clients * rate
    target_p99 = rounded(TARGET_RATIO_P99 * floor_p99) if floor_p99 else None
    delivered = share(ours["tokens_per_s_total"], offered)
    floor_delivered = share(floor["tokens_per_s_total"], offered)
    result: dict[str, Any] = {
        "bench": "stream",
        "mode": "default",
        "clients": clients,
        "web_processes": web,
        "tokens_per_s_total": ours["tokens_per_s_total"],
        "latency_ms_p50": ours["latency_ms_p50"],
        "latency_ms_p99": p99,
        "floor_latency_ms_p99": floor_p99,
        "ratio_vs_floor_p99": round(p99 / floor_p99, 3) if p99 and floor_p99 else None,
        "dropped_or_duplicated": ours["dropped_or_duplicated"],
        "floor_dropped_or_duplicated": floor["dropped_or_duplicated"],
        "target_ratio_vs_floor_p99": TARGET_RATIO_P99,
        # The target in this run's terms: TARGET_RATIO_P99 x the floor's p99.
        "target_latency_ms_p99": target_p99,
        "target_tokens_per_s": round(TARGET_THROUGHPUT * offered, 1),
        "tokens_per_s_per_client": rate,
        "tokens_per_s_offered": offered,
        "delivered_of_offered": rounded(delivered, 4),
        "floor_delivered_of_offered": rounded(floor_delivered, 4),
        # False: the floor itself fell behind, and the ratio is inconclusive at this size.
        "floor_kept_up": None if floor_delivered is None else floor_delivered >= TARGET_THROUGHPUT,
        "tokens_per_run": tokens,
        "ttft_ms": TTFT_MS,
        "client_processes": CLIENT_PROCS,
        "phases": [p.side for p in phases if p.measured],
    }
    result["targets_met"] = {
        "latency_p99": target_p99 is not None and p99 is not None and p99 <= target_p99,
        "dropped_or_duplicated": ours["dropped_or_duplicated"] == 0,
        "tokens_per_s": delivered is not None and delivered >= TARGET_THROUGHPUT,
    }
    for key, value in ours.items():
        result.setdefault(key, value)
    for key, value in floor.items():
        result[f"floor_{key}"] = value
    return result


def fmt(value: Any) -> str:
    return "-" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def met(ok: bool) -> str:
    return "met" if ok else "MISSED"


def print_table(result: dict[str, Any], phases: list[PhaseResult]) -> None:
    print(
        f"{result['clients']} WebSocket clients, each following its own run at"
        f" {fmt(result['tokens_per_s_per_client'])} tokens/s ({result['tokens_per_run']} tokens,"
        f" TTFT {TTFT_MS:.0f} ms), spread over {result['web_processes']} web processes;"
        f" {result['client_processes']} client processes;"
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
    print_targets(result)
    for error in result["errors"] + result["floor_errors"]:
        print(f"  client error: {error}")
    if result["asgi_log_errors"]:
        print(
            f"the web processes logged {result['asgi_log_errors']} errors (see the asgi*.log files)"
        )


def print_targets(result: dict[str, Any]) -> None:
    ok = result["targets_met"]
    print(
        f"target: latency p99 ≤ {TARGET_RATIO_P99:g} x floor p99"
        f" = {fmt(result['target_latency_ms_p99'])} ms"
        f" (measured {fmt(result['latency_ms_p99'])}, ratio {fmt(result['ratio_vs_floor_p99'])}):"
        f" {met(ok['latency_p99'])}"
    )
    print(
        f"target: dropped_or_duplicated = 0 (measured {result['dropped_or_duplicated']};"
        f" floor {result['floor_dropped_or_duplicated']}): {met(ok['dropped_or_duplicated'])}"
    )
    print(
        f"target: tokens/s ≥ {TARGET_THROUGHPUT:.0%} of offered"
        f" = {fmt(result['target_tokens_per_s'])}"
        f" (measured {fmt(result['tokens_per_s_total'])}): {met(ok['tokens_per_s'])}"
    )
    floor_share = result["floor_delivered_of_offered"]
    verdict = (
        "it kept up"
        if result["floor_kept_up"]
        else "it did NOT keep up: the machine is saturated at this size, the ratio is"
        " inconclusive; try fewer clients"
    )
    print(
        f"baseline: the floor delivered {fmt(result['floor_tokens_per_s_total'])} tokens/s of"
        f" {fmt(result['tokens_per_s_offered'])} offered"
        f" ({'-' if floor_share is None else f'{floor_share:.1%}'}): {verdict}"
    )
    engine = share(result["engine_tokens_per_s"], result["tokens_per_s_offered"])
    if engine is not None and engine < TARGET_THROUGHPUT:
        print(
            f"producer: the engine itself emitted {fmt(result['engine_tokens_per_s'])} tokens/s"
            f" in our phases ({engine:.1%} of offered): the machine could not generate the"
            " offered load, so tokens/s measures the machine, not only the server"
        )


# --- main ---------------------------------------------------------------------------------


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
    web: int | None = None,
    storm: bool = False,
    idle: int | None = None,
    noisy: bool = False,
) -> int:
    if sum((storm, idle is not None, noisy)) > 1:
        print("stream: --storm, --idle and --noisy are separate modes; pick one")
        return 2
    if (clients is not None and clients < 1) or (web is not None and web < 1):
        print("stream: --clients and --web must be at least 1")
        return 2
    if (rate is not None and rate <= 0) or (seconds is not None and seconds <= 0):
        print("stream: --rate and --seconds must be above 0")
        return 2
    raise_nofile()
    if (storm or idle is not None) and web is not None:
        print("stream: --storm runs two web processes and --idle one; --web does not apply")
        return 2
    if storm:
        from bench import stream_storm

        return stream_storm.main(quick=quick, victims=clients, rate=rate, seconds=seconds)
    if idle is not None:
        from bench import stream_idle

        if clients is not None or rate is not None or seconds is not None:
            print("stream: --idle takes its size as --idle N, and no --clients/--rate/--seconds")
            return 2
        return stream_idle.main(quick=quick, connections=idle or None)
    if noisy:
        from bench import stream_noisy

        return stream_noisy.main(
            quick=quick, clients=clients, rate=rate, seconds=seconds, web=web or WEB_PROCS
        )
    return default(quick=quick, clients=clients, rate=rate, seconds=seconds, web=web or WEB_PROCS)


def default(
    *, quick: bool, clients: int | None, rate: float | None, seconds: float | None, web: int
) -> int:
    count, rate_, tokens = sizes(quick, clients, rate, seconds)
    warm_tokens = max(1, round(rate_ * WARM_UP_S))
    phases: list[PhaseResult] = []
    with services("stream") as root:
        from bench.stream_producer import full_length_prompts

        prompts = full_length_prompts(count, tokens, "stream")
        warm_prompts = full_length_prompts(count, warm_tokens, "warm")
        who = bearer_and_graph(tokens)
        try:
            with running_stack(root, web=web, floor=True) as stack:
                plan = [(side, warm_prompts, warm_tokens, False) for side in SIDES]
                plan += [(side, prompts, tokens, True) for side in MEASURED]
                jobs = [make_jobs(who, side, p) for side, p, _, _ in plan]
                for (side, _, n, measured), side_jobs in zip(plan, jobs, strict=True):
                    follows = (
                        spread(stack, side_jobs, "ours", who.headers)
                        if side == "ours"
                        else on_floor(stack, side_jobs)
                    )
                    phase = run_phase(
                        stack, side, side_jobs, follows, rate=rate_, tokens=n,
                        ttft_ms=TTFT_MS, measured=measured,
                    )  # fmt: skip
                    phases.append(phase)
        finally:
            logs = keep_logs(root)
            asgi_errors = logged_errors(root)
    result = figures(phases, count, rate_, tokens, web)
    result["asgi_log_errors"] = asgi_errors
    print_table(result, phases)
    print(f"logs: {logs}")
    print("RESULT " + json.dumps(result))
    return 0 if result["dropped_or_duplicated"] == 0 else 1
