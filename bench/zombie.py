"""Zombie generations: how fast a stop reaches the engine, and how many tokens it produces
for nobody after the stop, against the request-tied way of serving where a client that
walks away leaves its request generating to the end.

    python -m bench zombie [--quick]

S streams (one run each, one `llm.generate` step of 400 tokens at 50 tokens/s) start
together on one GPU worker (threads pool) running the simulated engine. Half of them are
stopped at random moments (seeded), split across three paths: an API cancel
(`cancel_run` while the step streams), the run's deadline (`policies.ttl_s`, 2..6 s) and
the run's budget (`policies.budget_usd`, crossed after a random number of completion
tokens). The figures come from the stopped steps' rows: `stop_latency_ms` (the stop's
decision to the engine no longer generating) and `wasted_tokens` (tokens the engine
produced after the decision).

The baseline runs next in the same invocation: the same SimulatedEngine class with the same
settings, driven in this process with S concurrent `generate()` consumers on one asyncio
loop and the same prompts. Each stopped stream's client "leaves" at the same moment
relative to its first token as its Sluice twin was stopped (for the budget path: after the
same number of tokens), but nobody aborts the request, so it generates to the end; its
wasted tokens are the ones produced after the leave time. Prompts are chosen so that every
answer spends its whole token budget (the simulated engine's answers spend between half
and all of it), so every stream is the same length.

Offsets relative to the first token on the Sluice side are estimated as the step's claim
(`Step.started_at`) plus the engine's time to first token; that estimate is only used to
time the API cancels and to place the baseline's leave times.
"""

import asyncio
import json
import math
import random
import statistics
import time
from dataclasses import dataclass, field
from decimal import ROUND_UP, Decimal
from typing import Any

from bench.inference_kit import (
    TOKENS_PER_S,
    TTFT_MS,
    Drained,
    Leave,
    drive_direct,
    full_length_inputs,
    inference_workers,
    keep_logs,
    llm_spec,
    pct,
    rendered_prompt,
    rounded,
    warm_up,
)
from bench.stack import beat, services

MAX_TOKENS = 400
PATHS = ("api", "deadline", "budget")
SEED = 20240607
API_OFFSET_S = (0.2, 7.0)  # after the first token; a full answer streams for 8 s
DEADLINE_TTL_S = (2, 6)
BUDGET_TOKENS = (5, 380)
POLL_S = 0.01
RUN_TIMEOUT_S = 150.0
TARGET_STOP_LATENCY_MS_P99 = 50.0
TARGET_WASTED_TOKENS_P99 = 3.0


@dataclass
class Stream:
    index: int
    payload: dict[str, Any]
    path: str = ""  # "" when not stopped, else one of PATHS
    api_offset_s: float = 0.0
    ttl_s: int = 0
    budget_usd: Decimal | None = None
    budget_tokens: int = 0  # the completion token whose cost crosses the budget
    run: Any = None
    cancel_due: float | None = None
    cancel_at: float | None = None
    # The stop's moment relative to the first token (Sluice side, estimated), seconds.
    offset_s: float | None = None
    row: dict[str, Any] = field(default_factory=dict)


def plan(streams: int, rng: random.Random) -> list[Stream]:
    inputs = full_length_inputs(streams, MAX_TOKENS, "zombie")
    planned = [Stream(i, payload) for i, payload in enumerate(inputs)]
    stopped = rng.sample(planned, streams // 2)
    for n, stream in enumerate(stopped):
        stream.path = PATHS[n % len(PATHS)]
        if stream.path == "api":
            stream.api_offset_s = rng.uniform(*API_OFFSET_S)
        elif stream.path == "deadline":
            stream.ttl_s = rng.randint(*DEADLINE_TTL_S)
        else:
            set_budget(stream, rng.randint(*BUDGET_TOKENS))
    return planned


def set_budget(stream: Stream, tokens: int) -> None:
    """A run budget (6 decimal places) crossed by about the `tokens`-th completion token;
    `budget_tokens` is the exact token that crosses it, as the meter counts."""
    from workers.inference.registry import platform_models
    from workers.operators.llm import estimate_prompt_tokens

    spec = platform_models()["default"]
    prompt_cost = spec.cost(estimate_prompt_tokens(rendered_prompt(stream.payload)), 0)
    per_token = spec.cost(0, 1)
    budget = (prompt_cost + tokens * per_token).quantize(Decimal("0.000001"), ROUND_UP)
    stream.budget_usd = budget
    stream.budget_tokens = math.ceil((budget - prompt_cost) / per_token)


def create_graphs(streams: list[Stream]) -> dict[Any, Any]:
    """One graph version per distinct policy: plain, each ttl, each budget."""
    from apps.graphs.services import create_graph

    versions: dict[Any, Any] = {}
    for stream in streams:
        key = policy_key(stream)
        if key in versions:
            continue
        policies: dict[str, Any] = {}
        if stream.path == "deadline":
            policies["ttl_s"] = stream.ttl_s
        elif stream.path == "budget":
            policies["budget_usd"] = float(stream.budget_usd or 0)
        slug = f"zombie-{len(versions)}"
        graph = create_graph(
            slug=slug, name=slug, spec=llm_spec(MAX_TOKENS, policies), actor="bench"
        )
        versions[key] = graph.live_version()
    return versions


def policy_key(stream: Stream) -> tuple[str, Any]:
    if stream.path == "deadline":
        return ("ttl", stream.ttl_s)
    if stream.path == "budget":
        return ("budget", stream.budget_usd)
    return ("plain", None)


def run_sluice(streams: list[Stream], versions: dict[Any, Any]) -> float:
    """Starts every run, fires the API cancels on time, waits for every run to end.
    Returns the wall time from the first start to the last end seen, seconds."""
    from apps.runs.services import start_run

    started = time.time()
    for stream in streams:
        version = versions[policy_key(stream)]
        stream.run = start_run(version=version, payload=stream.payload, actor="bench")
    if any(s.budget_usd is not None and s.run.budget_usd != s.budget_usd for s in streams):
        raise RuntimeError("a run's budget_usd differs from its graph's policies.budget_usd")
    drive_cancels(streams)
    return time.time() - started


def drive_cancels(streams: list[Stream]) -> None:
    from apps.runs.models import Run, Step
    from apps.runs.services import cancel_run

    by_run = {s.run.id: s for s in streams}
    waiting = {s.run.id for s in streams if s.path == "api"}
    active = set(by_run)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    last_status_check = 0.0
    while active:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(active)} runs still active after {RUN_TIMEOUT_S:.0f}s")
        unscheduled = [r for r in waiting if by_run[r].cancel_due is None]
        if unscheduled:
            claimed = Step.objects.filter(
                run_id__in=unscheduled, node_id="gen", started_at__isnull=False
            ).values_list("run_id", "started_at")
            for run_id, started_at in claimed:
                stream = by_run[run_id]
                stream.cancel_due = started_at.timestamp() + TTFT_MS / 1000 + stream.api_offset_s
        now = time.time()
        for run_id in [r for r in waiting if (by_run[r].cancel_due or math.inf) <= now]:
            stream = by_run[run_id]
            stream.cancel_at = time.time()
            cancel_run(stream.run, actor="bench")
            waiting.discard(run_id)
        if time.monotonic() - last_status_check > 0.2:
            last_status_check = time.monotonic()
            ended = Run.objects.filter(id__in=active).exclude(status__in=("queued", "running"))
            active -= set(ended.values_list("id", flat=True))
        time.sleep(POLL_S)


def read_rows(streams: list[Stream]) -> None:
    from apps.runs.models import Run, Step

    runs = {r.id: r for r in Run.objects.filter(id__in=[s.run.id for s in streams])}
    steps = {s.run_id: s for s in Step.objects.filter(run_id__in=list(runs), node_id="gen")}
    for stream in streams:
        run = runs[stream.run.id]
        step = steps.get(run.id)
        stream.row = {
            "run_status": run.status,
            "run_error": run.error,
            "deadline": run.deadline.timestamp() if run.deadline else None,
            "step_status": step.status if step else "never created",
            "started_at": step.started_at.timestamp() if step and step.started_at else None,
            "finished_at": step.finished_at.timestamp() if step and step.finished_at else None,
            "tokens_out": step.tokens_out if step else 0,
            "wasted_tokens": step.wasted_tokens if step else 0,
            "stop_latency_ms": step.stop_latency_ms if step else None,
            "skip_reason": step.skip_reason if step else "",
            "attempt": step.attempt if step else 0,
            "error": step.error if step else "",
        }
        first_token = (stream.row["started_at"] or math.nan) + TTFT_MS / 1000
        if stream.path == "api" and stream.cancel_at is not None:
            stream.offset_s = stream.cancel_at - first_token
        elif stream.path == "deadline" and stream.row["deadline"] is not None:
            stream.offset_s = stream.row["deadline"] - first_token
        if stream.offset_s is not None and math.isnan(stream.offset_s):
            stream.offset_s = None


# --- the baseline: the request-tied way, nobody aborts ------------------------------------


def run_baseline(streams: list[Stream], capacity: int) -> list[Drained]:
    leaves: list[Leave | None] = []
    for stream in streams:
        if stream.path == "budget":
            leaves.append(Leave(after_tokens=stream.budget_tokens))
        elif stream.path:
            # A stop before the first token: the client left before reading anything.
            offset = stream.offset_s if stream.offset_s is not None else 0.0
            leaves.append(Leave(after_s=offset))
        else:
            leaves.append(None)
    prompts = [rendered_prompt(s.payload) for s in streams]
    drained, _, _ = asyncio.run(drive_direct(prompts, MAX_TOKENS, leaves, capacity))
    return drained


# --- figures ------------------------------------------------------------------------------


def stop_figures(stopped: list[Stream], baseline: dict[int, Drained]) -> dict[str, Any]:
    latencies = [s.row["stop_latency_ms"] for s in stopped]
    wasted = [float(s.row["wasted_tokens"]) for s in stopped]
    base = [float(baseline[s.index].wasted) for s in stopped]
    offsets = [s.offset_s for s in stopped if s.offset_s is not None]
    # How long each baseline zombie went on generating after its client left.
    zombie_s = [
        max(0.0, (d.last_at or 0.0) - d.leave_at)
        for d in (baseline[s.index] for s in stopped)
        if d.leave_at is not None
    ]
    return {
        "n": len(stopped),
        "stop_latency_ms_p50": rounded(pct(latencies, 0.5)),
        "stop_latency_ms_p99": rounded(pct(latencies, 0.99)),
        "stop_latency_ms_mean": rounded(statistics.fmean(latencies) if latencies else None),
        "wasted_tokens_per_cancel_p50": rounded(pct(wasted, 0.5)),
        "wasted_tokens_per_cancel_p99": rounded(pct(wasted, 0.99)),
        "wasted_tokens_per_cancel_mean": rounded(statistics.fmean(wasted) if wasted else None, 3),
        "baseline_wasted_tokens_per_cancel_mean": rounded(
            statistics.fmean(base) if base else None, 3
        ),
        "baseline_wasted_tokens_per_cancel_p99": rounded(pct(base, 0.99)),
        "baseline_zombie_s_mean": rounded(statistics.fmean(zombie_s) if zombie_s else None),
        "stop_offset_s_mean": rounded(statistics.fmean(offsets) if offsets else None),
    }


def outcome_expected(stream: Stream) -> bool:
    status = stream.row["run_status"]
    return {"api": "cancelled", "deadline": "failed", "budget": "budget_exceeded"}.get(
        stream.path, "succeeded"
    ) == status


def figures(
    streams: list[Stream], baseline: list[Drained], wall_s: float, capacity: int
) -> dict[str, Any]:
    by_index = {s.index: baseline[s.index] for s in streams}
    cancelled = [s for s in streams if s.path]
    measured = [s for s in cancelled if s.row["stop_latency_ms"] is not None]
    unmeasured = [s for s in cancelled if s.row["stop_latency_ms"] is None]
    overall = stop_figures(measured, by_index)
    ours_mean = overall["wasted_tokens_per_cancel_mean"]
    base_mean = overall["baseline_wasted_tokens_per_cancel_mean"]
    completed = [s for s in streams if not s.path and s.row["run_status"] == "succeeded"]
    rates = [
        s.row["tokens_out"] / (s.row["finished_at"] - s.row["started_at"] - TTFT_MS / 1000)
        for s in completed
        if s.row["finished_at"] and s.row["started_at"]
    ]
    result: dict[str, Any] = {
        "bench": "zombie",
        "streams": len(streams),
        "cancelled": len(cancelled),
        "cancelled_with_stop_latency": len(measured),
        "cancelled_without_stop_latency": len(unmeasured),
        "cancelled_unexpected_outcome": sum(not outcome_expected(s) for s in cancelled),
        "stop_latency_ms_p50": overall["stop_latency_ms_p50"],
        "stop_latency_ms_p99": overall["stop_latency_ms_p99"],
        "stop_latency_ms_mean": overall["stop_latency_ms_mean"],
        "wasted_tokens_per_cancel_mean": ours_mean,
        "wasted_tokens_per_cancel_p50": overall["wasted_tokens_per_cancel_p50"],
        "wasted_tokens_per_cancel_p99": overall["wasted_tokens_per_cancel_p99"],
        "baseline_wasted_tokens_per_cancel_mean": base_mean,
        "baseline_wasted_tokens_per_cancel_p99": overall["baseline_wasted_tokens_per_cancel_p99"],
        "baseline_zombie_s_mean": overall["baseline_zombie_s_mean"],
        "stop_offset_s_mean": overall["stop_offset_s_mean"],
        "wasted_ratio_vs_baseline": (
            round(ours_mean / base_mean, 4) if ours_mean is not None and base_mean else None
        ),
        "target_stop_latency_ms_p99": TARGET_STOP_LATENCY_MS_P99,
        "target_wasted_tokens_per_cancel_p99": TARGET_WASTED_TOKENS_P99,
        "tokens_per_s": TOKENS_PER_S,
        "ttft_ms": TTFT_MS,
        "max_tokens": MAX_TOKENS,
        "answer_tokens": MAX_TOKENS,
        "batch_capacity": capacity,
        "completed_streams": len(completed),
        "completed_stream_tokens_per_s_p50": rounded(pct(rates, 0.5)),
        "completed_stream_tokens_per_s_min": rounded(min(rates) if rates else None),
        "incomplete_uncancelled_streams": sum(
            1 for s in streams if not s.path and s.row["run_status"] != "succeeded"
        ),
        "sluice_wall_s": round(wall_s, 1),
        "seed": SEED,
    }
    for path in PATHS:
        on_path = [s for s in measured if s.path == path]
        for key, value in stop_figures(on_path, by_index).items():
            result[f"{path}_{key}"] = value
        result[f"{path}_without_stop_latency"] = sum(1 for s in unmeasured if s.path == path)
    # The budget path's meter must stop a stream at the token whose cost crosses the budget.
    result["budget_stopped_at_other_token"] = sum(
        1
        for s in measured
        if s.path == "budget" and s.row["tokens_out"] - s.row["wasted_tokens"] != s.budget_tokens
    )
    result["without_stop_latency_wasted_tokens_sum"] = sum(
        s.row["wasted_tokens"] for s in unmeasured
    )
    result["without_stop_latency_tokens_out_sum"] = sum(s.row["tokens_out"] for s in unmeasured)
    return result


def print_table(result: dict[str, Any], streams: list[Stream]) -> None:
    print(
        f"{result['streams']} streams of {MAX_TOKENS} tokens at {TOKENS_PER_S:.0f} tokens/s"
        f" (TTFT {TTFT_MS:.0f} ms), {result['cancelled']} stopped; Sluice part"
        f" {result['sluice_wall_s']} s"
    )
    header = f"{'path':<9}{'n':>4}{'latency p50':>13}{'p99':>9}{'mean':>9}"
    print(header + f"{'wasted mean':>13}{'p99':>7}{'baseline mean':>15}{'no latency':>12}")
    rows = [("all", "")] + [(p, f"{p}_") for p in PATHS]
    for label, prefix in rows:
        n = result[f"{prefix}n"] if prefix else result["cancelled_with_stop_latency"]
        missing = (
            result[f"{prefix}without_stop_latency"]
            if prefix
            else result["cancelled_without_stop_latency"]
        )
        print(
            f"{label:<9}{n:>4}{fmt(result[f'{prefix}stop_latency_ms_p50']):>13}"
            f"{fmt(result[f'{prefix}stop_latency_ms_p99']):>9}"
            f"{fmt(result[f'{prefix}stop_latency_ms_mean']):>9}"
            f"{fmt(result[f'{prefix}wasted_tokens_per_cancel_mean']):>13}"
            f"{fmt(result[f'{prefix}wasted_tokens_per_cancel_p99']):>7}"
            f"{fmt(result[f'{prefix}baseline_wasted_tokens_per_cancel_mean']):>15}"
            f"{missing:>12}"
        )
    print(
        f"target: stop latency p99 ≤ {TARGET_STOP_LATENCY_MS_P99:.0f} ms"
        f" (measured {fmt(result['stop_latency_ms_p99'])}),"
        f" wasted tokens p99 ≤ {TARGET_WASTED_TOKENS_P99:.0f}"
        f" (measured {fmt(result['wasted_tokens_per_cancel_p99'])});"
        f" wasted vs baseline {fmt(result['wasted_ratio_vs_baseline'])}"
    )
    print(
        "latency and wasted figures are over stopped steps with a stop_latency_ms"
        " (percentiles by nearest rank)"
    )
    for stream in streams:
        if stream.path and (stream.row["stop_latency_ms"] is None or not outcome_expected(stream)):
            row = stream.row
            print(
                f"  {stream.path:<8} run {row['run_status']:<15} step {row['step_status']:<8}"
                f" no stop latency={row['stop_latency_ms'] is None}"
                f" offset {fmt(stream.offset_s)} s, tokens {row['tokens_out']},"
                f" skip '{row['skip_reason']}' error '{row['run_error'] or row['error']}'"[:200]
            )


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def main(*, quick: bool) -> int:
    count = 48 if quick else 200
    capacity = max(count, 64)
    rng = random.Random(SEED)
    with services("zombie") as root, beat(root):
        from apps.tenants.context import tenant_context
        from apps.tenants.services import create_tenant

        streams = plan(count, rng)
        tenant = create_tenant(slug="bench", name="Bench", actor="bench")
        try:
            with (
                inference_workers(root, threads=count + 8, batch_capacity=capacity),
                tenant_context(tenant),
            ):
                warm_up()
                versions = create_graphs(streams)
                wall_s = run_sluice(streams, versions)
                read_rows(streams)
            baseline = run_baseline(streams, capacity)
        finally:
            logs = keep_logs(root)
    result = figures(streams, baseline, wall_s, capacity)
    print_table(result, streams)
    print(f"worker logs: {logs}")
    print("RESULT " + json.dumps(result))
    return 0 if result["cancelled_unexpected_outcome"] == 0 else 1
