"""Provider storm: a graph of chained `llm.generate` steps under a scripted provider fault
profile, through Sluice's flow control and through per-call exponential backoff with
jitter (the common practice), on the same engine and the same load.

    python -m bench storm [--quick]

Two fake OpenAI-compatible providers listen on loopback (tests/harness/fake_openai.py):
`primary`, which goes through the fault profile, and `backup`, healthy, of the same tier.
Each healthy call answers `MAX_TOKENS` tokens at 400 tokens/s after 50 ms: about 0.1 s.

The fault profile, on the primary only, is keyed on the time since its clock started; each
mode starts a fresh clock and goes through the same four phases of P seconds:

- normal: every request is served;
- throttled: the provider's capacity drops to CAPACITY_SHARE (75%) of the healthy request
  rate. It is a server-side token bucket refilling at that rate and holding at most one
  second's worth, full when the phase begins; a request that finds it empty is answered 429
  with `Retry-After: 1` and costs no token. The healthy rate is measured, not assumed: the
  requests the primary received during the first mode's (the baseline's) normal phase, over
  P; the bucket's rate is fixed from it when that mode's throttled phase begins and kept for
  the Sluice mode, so both face the same capacity (both normal-phase rates are reported);
- outage: every request is answered 503 (no Retry-After);
- recovery: every request is served again, until the window ends.

The load is closed-loop, as agentic clients behave: K agents (12 quick, 16 full) each have
one run of the chain (`source.manual` then N `llm.generate` steps, each prompted with the
previous step's answer) in flight at a time, and start their next run as soon as the
previous one ends, whatever its outcome, for the whole 4P-second window. One loop polls all
the agents' runs together, one query every POLL_S (50 ms), to keep the bench's own CPU low.
K is picked so that a healthy primary is well loaded (one call per agent in flight, about
75 requests/s quick on the 2-core machine) without reaching Sluice's concurrency limit of 16.
An open-loop load (runs arriving at a fixed rate whatever happens to earlier ones) caps
goodput at the offered rate: a client that recovers quickly can deliver no more than was
offered, so the ratio shows only the runs the baseline loses. In a closed loop a client
whose calls stall in backoff also stops offering work, as a real agent does, and the
goodput is what each mode gets through in the same time. At the window's end the agents'
runs still in flight (or ended after it) are `unfinished`: the active ones are cancelled, and
none counts toward goodput or failed steps; the bench then waits up to SETTLE_S for their
steps to settle.

The two modes run one after the other in this invocation, baseline first, each on a fresh
phase clock with the same K and phases, with flow control's Redis state (`sluice:flow:*`)
cleared before each. Interleaving halves (what BENCHMARKS.md asks) would cut a fault profile
in two; one full profile per mode on the same worker processes is the fair comparison here.

- sluice: model `storm-primary` on the primary, flow-controlled (adaptive concurrency,
  Retry-After pause, circuit breaker, retry budget), falling back to `storm-backup` on the
  backup provider. A transient failure is retried in 0.05-0.3 s and routed afresh.
- baseline: model `base-primary`, the same engine on the same primary provider, with flow
  control off (`"flow": {"enabled": false}`) and no fallback: each failed call is retried
  with the node's exponential backoff with equal jitter, 0.5 s doubling per attempt, and
  Retry-After is not honoured. Both graphs allow 6 attempts per step.

Figures, read from the steps' rows and the fakes' request records (nothing estimated):
goodput is the completion tokens (`Step.tokens_out`) of llm steps of runs that succeeded
and ended within the window, over the window's length 4P; attempts per success is provider
requests over completed streams (for Sluice over both providers; requests of cancelled runs
included); step latency is `finished_at - created_at` of llm steps that are done (p99 by
nearest rank); failed steps are llm steps dead or skipped of runs that ended within the
window (`unfinished_runs` is reported apart). `calls` is what the providers received in the
Sluice mode. Per phase, within the window: the primary's requests and the share answered
429/5xx by when they arrived, and llm steps done and their tokens by when they finished.
`fault_window_goodput_tokens_per_s` counts only tokens (of done steps of succeeded runs)
that finished during the throttled and outage phases, over those 2P seconds: what each mode
delivered while the provider misbehaved. `fallback_reasons` sorts the steps the backup
served by why the primary was passed over (from `Step.route`). `start_lag_s_max` is the
longest an agent's run had ended before the poll started its next one.
"""

import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from bench.inference_kit import keep_logs, pct, rounded
from bench.stack import beat, services, worker
from tests.harness.fake_openai import FakeOpenAI, Fault, StreamRecord
from workers.queues import CPU_WORKER_QUEUES

PHASES = ("normal", "throttled", "outage", "recovery")
MAX_TOKENS = 20
TOKENS_PER_S = 400.0
TTFT_S = 0.05
CAPACITY_SHARE = 0.75  # of the healthy request rate measured in the normal phase
MAX_ATTEMPTS = 6
BACKOFF_S = 0.5
GPU_THREADS = 32
POLL_S = 0.05  # how often the agents' runs are polled, all in one query
SETTLE_S = 30.0
TARGET_GOODPUT_RATIO = 1.5
TARGET_ATTEMPTS_PER_SUCCESS = 1.2
SLUICE_FLOW = {
    "provider": "primary",
    "max_concurrency": 16,
    "wait_limit_s": 1.0,
    "breaker_failures": 5,
    "breaker_open_s": 2.0,
}
BACKUP_FLOW = {"provider": "backup", "max_concurrency": 16}


@dataclass(frozen=True)
class Size:
    steps: int
    phase_s: float
    agents: int  # closed-loop clients, each with one chain run in flight at a time

    @property
    def window_s(self) -> float:
        return self.phase_s * len(PHASES)


QUICK = Size(steps=4, phase_s=9.0, agents=12)
FULL = Size(steps=6, phase_s=25.0, agents=16)


class FaultProfile:
    """The primary's faults (see the module docstring); a FakeOpenAI `faults` callable,
    called from the fake's handler threads."""

    def __init__(self, phase_s: float) -> None:
        self.phase_s = phase_s
        # The throttled bucket's refill rate: CAPACITY_SHARE of the request rate the primary
        # received in the first mode's normal phase, fixed then and kept for the next mode.
        self.capacity_per_s: float | None = None
        self.normal_rps: list[float] = []  # each mode's measured normal-phase request rate
        self._normal_calls = 0
        self._lock = threading.Lock()
        self._started: float | None = None
        self._tokens = 0.0
        self._refilled_at: float | None = None

    def start(self) -> float:
        with self._lock:
            self._started = time.time()
            self._refilled_at = None
            self._normal_calls = 0
            return self._started

    def stop(self) -> None:
        with self._lock:
            self._started = None

    def phase_at(self, at: float, started: float) -> str:
        return PHASES[min(int(max(0.0, at - started) // self.phase_s), len(PHASES) - 1)]

    def __call__(self, index: int, body: Any) -> Fault | None:
        now = time.time()
        with self._lock:
            if self._started is None:
                return None
            phase = self.phase_at(now, self._started)
            if phase == "normal":
                self._normal_calls += 1
                return None
            if phase == "outage":
                return Fault(status=503, message="the service is temporarily unavailable")
            if phase != "throttled":
                return None
            return self._take_token(now)

    def _take_token(self, now: float) -> Fault | None:
        if self._refilled_at is None:  # the phase begins with a full bucket
            self.normal_rps.append(self._normal_calls / self.phase_s)
            if self.capacity_per_s is None:
                self.capacity_per_s = self.normal_rps[0] * CAPACITY_SHARE
            self._tokens, self._refilled_at = self.capacity_per_s, now
        capacity = self.capacity_per_s
        assert capacity is not None
        elapsed = now - self._refilled_at
        self._tokens = min(capacity, self._tokens + elapsed * capacity)
        self._refilled_at = now
        if self._tokens >= 1:
            self._tokens -= 1
            return None
        return Fault(status=429, retry_after="1", message="rate limit reached; retry after 1 s")


def model_entry(fake: FakeOpenAI, name: str, **fields: Any) -> dict[str, Any]:
    # The provider-side model name is the registry name, so each request names its mode.
    params = {"base_url": fake.base_url, "model": name, "stall_timeout_s": 2.0}
    return {"engine": "openai", "params": params, "quality": 2, **fields}


def registry(primary: FakeOpenAI, backup: FakeOpenAI) -> dict[str, Any]:
    return {
        "storm-primary": model_entry(
            primary, "storm-primary", fallbacks=["storm-backup"], flow=SLUICE_FLOW
        ),
        "storm-backup": model_entry(backup, "storm-backup", flow=BACKUP_FLOW),
        "base-primary": model_entry(primary, "base-primary", flow={"enabled": False}),
    }


def chain_spec(model: str, steps: int) -> dict[str, Any]:
    nodes: list[dict[str, Any]] = [{"id": "in", "type": "source.manual"}]
    edges = []
    for i in range(1, steps + 1):
        prompt = f"Step {i}: " + ("{{ q }}" if i == 1 else "{{ text }}")
        nodes.append(
            {
                "id": f"llm{i}",
                "type": "llm.generate",
                "config": {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS},
                "retry": {"max_attempts": MAX_ATTEMPTS, "backoff_s": BACKOFF_S},
            }
        )
        edges.append([nodes[-2]["id"], nodes[-1]["id"]])
    return {"nodes": nodes, "edges": edges}


@dataclass
class Mode:
    name: str  # "baseline" or "sluice"
    version: Any
    started: float = 0.0  # the phase clock's start, when the agents start their first runs
    window_end: float = 0.0  # the end of the four phases
    run_ids: list[Any] = field(default_factory=list)
    unfinished: set[Any] = field(default_factory=set)  # in flight at the window's end
    cancelled: int = 0  # of those, the ones the bench cancelled
    start_lag_s: float = 0.0  # the longest an ended run waited for the poll to replace it
    requests: list[StreamRecord] = field(default_factory=list)


def reset_flow_state() -> None:
    from sluice.redis_client import redis_client

    client = redis_client()
    keys = list(client.scan_iter(match="sluice:flow:*", count=1000))
    if keys:
        client.delete(*keys)


def drive(mode: Mode, size: Size, profile: FaultProfile, fakes: list[FakeOpenAI]) -> None:
    """Closed loop: each agent starts a run, and its next one as soon as the poll sees the
    previous one ended, until the four phases are over; then the runs still in flight are
    cancelled and their steps left to settle."""
    from apps.runs.models import ACTIVE_RUN_STATUSES, Run
    from apps.runs.services import start_run

    reset_flow_state()
    marks = [len(fake.streams) for fake in fakes]

    def launch(agent: int) -> Any:
        payload = {"q": f"{mode.name} agent {agent} run {len(mode.run_ids)}"}
        run = start_run(version=mode.version, payload=payload, actor="bench")
        mode.run_ids.append(run.id)
        return run.id

    mode.started = profile.start()
    mode.window_end = mode.started + size.window_s
    live = {agent: launch(agent) for agent in range(size.agents)}
    while True:
        time.sleep(max(0.0, min(POLL_S, mode.window_end - time.time())))
        polled = time.time()
        if polled >= mode.window_end:
            break
        ended = dict(
            Run.unscoped_all_tenants.filter(id__in=list(live.values()))
            .exclude(status__in=ACTIVE_RUN_STATUSES)
            .values_list("id", "finished_at")
        )
        for agent, run_id in live.items():
            if run_id in ended:
                lag = polled - ended[run_id].timestamp()
                mode.start_lag_s = max(mode.start_lag_s, lag)
                live[agent] = launch(agent)
    settle(mode, list(live.values()))
    profile.stop()
    for fake, mark in zip(fakes, marks, strict=True):
        with fake.lock:
            mode.requests += fake.streams[mark:]


def settle(mode: Mode, last_runs: list[Any]) -> None:
    """The agents' last runs that had not ended by the window's end are unfinished: those
    still active are cancelled. Then waits (up to SETTLE_S) for every step to settle, so
    that nothing of this mode runs into the next."""
    from django.db.models import Q

    from apps.runs.models import ACTIVE_RUN_STATUSES, Run, Step
    from apps.runs.services import cancel_run

    end = datetime.fromtimestamp(mode.window_end, tz=UTC)
    late = Run.unscoped_all_tenants.filter(id__in=last_runs).filter(
        Q(status__in=ACTIVE_RUN_STATUSES) | Q(finished_at__gt=end)
    )
    for run in late:
        mode.unfinished.add(run.id)
        if run.status in ACTIVE_RUN_STATUSES:
            mode.cancelled += cancel_run(run, actor="bench")
    open_steps = Step.unscoped_all_tenants.filter(
        run_id__in=mode.run_ids, status__in=("queued", "running", "failed")
    )
    settle_by = time.monotonic() + SETTLE_S
    while open_steps.exists() and time.monotonic() < settle_by:
        time.sleep(0.25)


def step_rows(mode: Mode) -> list[dict[str, Any]]:
    """The llm steps of the mode's runs, each with its run's status; a run in flight at the
    window's end reads `unfinished` (whatever the cancellation made of it)."""
    from apps.runs.models import Run, Step

    statuses = dict(
        Run.unscoped_all_tenants.filter(id__in=mode.run_ids).values_list("id", "status")
    )
    rows = list(
        Step.unscoped_all_tenants.filter(run_id__in=mode.run_ids, node_type="llm.generate").values(
            "run_id", "status", "tokens_out", "model", "route", "created_at", "finished_at"
        )
    )
    for row in rows:
        run_id = row["run_id"]
        row["run_status"] = "unfinished" if run_id in mode.unfinished else statuses[run_id]
    return rows


def run_figures(mode: Mode) -> dict[str, Any]:
    from apps.runs.models import Run

    runs = list(Run.unscoped_all_tenants.filter(id__in=mode.run_ids).values("id", "status"))
    ended = [r for r in runs if r["id"] not in mode.unfinished]
    return {
        "runs": len(runs),
        "succeeded_runs": sum(r["status"] == "succeeded" for r in ended),
        "failed_runs": sum(r["status"] != "succeeded" for r in ended),
        "unfinished_runs": len(mode.unfinished),
        "cancelled_runs": mode.cancelled,
        "wall_s": mode.window_end - mode.started,
    }


def step_figures(rows: list[dict[str, Any]]) -> dict[str, Any]:
    done = [r for r in rows if r["status"] == "done"]
    latencies = [(r["finished_at"] - r["created_at"]).total_seconds() for r in done]
    settled = [
        (r["finished_at"] - r["created_at"]).total_seconds()
        for r in rows
        if r["status"] in ("done", "dead", "skipped") and r["finished_at"] is not None
    ]
    ended = [r for r in rows if r["run_status"] != "unfinished"]
    return {
        "llm_steps": len(rows),
        "done_steps": len(done),
        "failed_steps": sum(r["status"] != "done" for r in ended),
        "dead_steps": sum(r["status"] == "dead" for r in ended),
        "good_tokens": sum(r["tokens_out"] for r in rows if r["run_status"] == "succeeded"),
        "p50_step_latency_s": rounded(pct(latencies, 0.5), 3),
        "p99_step_latency_s": rounded(pct(latencies, 0.99), 3),
        "p99_settled_step_latency_s": rounded(pct(settled, 0.99), 3),
        "served_by_fallback": sum(r["model"] == "storm-backup" for r in done),
        "fallback_reasons": fallback_reasons(done),
    }


FALLBACK_REASONS = {
    "circuit breaker is open": "breaker_open",
    "half-open": "breaker_probe",
    "Retry-After": "retry_after_pause",
    "concurrency limit": "concurrency",
    "retry budget": "retry_budget",
}


def fallback_reasons(done: list[dict[str, Any]]) -> dict[str, int]:
    """Why steps served by the backup passed the primary over, from `Step.route`."""
    counts: dict[str, int] = {}
    for row in done:
        if row["model"] != "storm-backup":
            continue
        kind = next((k for text, k in FALLBACK_REASONS.items() if text in row["route"]), "other")
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def model_of(record: StreamRecord) -> Any:
    return record.body.get("model") if isinstance(record.body, dict) else None


def request_figures(requests: list[StreamRecord]) -> dict[str, Any]:
    successes = sum(r.completed for r in requests)
    return {
        "calls": len(requests),
        "successful_calls": successes,
        "calls_429": sum(r.status == 429 for r in requests),
        "calls_5xx": sum(r.status >= 500 for r in requests),
        "attempts_per_success": round(len(requests) / successes, 3) if successes else None,
    }


def phase_figures(mode: Mode, rows: list[dict[str, Any]], profile: FaultProfile) -> list[Any]:
    """Per phase (within the window): the primary's requests and the share refused, by when
    they started, and llm steps done with their tokens, by when they finished."""
    phases = []
    for phase in PHASES:
        primary = [
            r
            for r in mode.requests
            if model_of(r) != "storm-backup"
            and r.started_at < mode.window_end
            and profile.phase_at(r.started_at, mode.started) == phase
        ]
        done = [
            r
            for r in rows
            if r["status"] == "done"
            and r["finished_at"].timestamp() < mode.window_end
            and profile.phase_at(r["finished_at"].timestamp(), mode.started) == phase
        ]
        refused = sum(r.status == 429 for r in primary)
        phases.append(
            {
                "phase": phase,
                "primary_calls": len(primary),
                "share_429": round(refused / len(primary), 3) if primary else None,
                "share_5xx": round(sum(r.status >= 500 for r in primary) / len(primary), 3)
                if primary
                else None,
                "done_steps": len(done),
                "done_tokens": sum(r["tokens_out"] for r in done),
            }
        )
    return phases


def fault_window_goodput(mode: Mode, rows: list[dict[str, Any]], profile: FaultProfile) -> float:
    """Goodput while the provider misbehaves: tokens of done llm steps of succeeded runs
    that finished in the throttled or outage phase, over those phases' length."""
    window = ("throttled", "outage")
    tokens = sum(
        r["tokens_out"]
        for r in rows
        if r["status"] == "done"
        and r["run_status"] == "succeeded"
        and profile.phase_at(r["finished_at"].timestamp(), mode.started) in window
    )
    return round(tokens / (profile.phase_s * len(window)), 2)


def mode_figures(mode: Mode, profile: FaultProfile) -> dict[str, Any]:
    rows = step_rows(mode)
    figures = {**run_figures(mode), **step_figures(rows), **request_figures(mode.requests)}
    figures["goodput_tokens_per_s"] = round(figures["good_tokens"] / figures["wall_s"], 2)
    figures["fault_window_goodput_tokens_per_s"] = fault_window_goodput(mode, rows, profile)
    figures["start_lag_s_max"] = round(mode.start_lag_s, 3)
    figures["phases"] = phase_figures(mode, rows, profile)
    return figures


def summarize(
    size: Size, profile: FaultProfile, base: dict[str, Any], ours: dict[str, Any]
) -> dict[str, Any]:
    normal_rps, capacity_rps = profile.normal_rps, profile.capacity_per_s
    ratio = (
        round(ours["goodput_tokens_per_s"] / base["goodput_tokens_per_s"], 3)
        if base["goodput_tokens_per_s"]
        else None
    )
    result: dict[str, Any] = {
        "bench": "storm",
        "calls": ours["calls"],
        "goodput_tokens_per_s": ours["goodput_tokens_per_s"],
        "baseline_goodput_tokens_per_s": base["goodput_tokens_per_s"],
        "goodput_ratio_vs_backoff": ratio,
        "attempts_per_success": ours["attempts_per_success"],
        "baseline_attempts_per_success": base["attempts_per_success"],
        "p99_step_latency_s": ours["p99_step_latency_s"],
        "baseline_p99_step_latency_s": base["p99_step_latency_s"],
        "failed_steps": ours["failed_steps"],
        "baseline_failed_steps": base["failed_steps"],
        "baseline_calls": base["calls"],
        "served_by_fallback": ours["served_by_fallback"],
        "fallback_reasons": ours["fallback_reasons"],
        "fault_window_goodput_tokens_per_s": ours["fault_window_goodput_tokens_per_s"],
        "baseline_fault_window_goodput_tokens_per_s": base["fault_window_goodput_tokens_per_s"],
        "fault_window_goodput_ratio_vs_backoff": (
            round(
                ours["fault_window_goodput_tokens_per_s"]
                / base["fault_window_goodput_tokens_per_s"],
                3,
            )
            if base["fault_window_goodput_tokens_per_s"]
            else None
        ),
    }
    for key in (
        "runs",
        "succeeded_runs",
        "failed_runs",
        "unfinished_runs",
        "llm_steps",
        "done_steps",
        "dead_steps",
        "good_tokens",
        "wall_s",
        "successful_calls",
        "calls_429",
        "calls_5xx",
        "p50_step_latency_s",
        "p99_settled_step_latency_s",
        "cancelled_runs",
        "start_lag_s_max",
    ):
        result[key] = rounded(ours[key], 3)
        result[f"baseline_{key}"] = rounded(base[key], 3)
    result["phases"] = ours["phases"]
    result["baseline_phases"] = base["phases"]
    result.update(
        load="closed-loop",
        agents=size.agents,
        poll_s=POLL_S,
        steps_per_run=size.steps,
        phase_s=size.phase_s,
        window_s=size.window_s,
        baseline_normal_phase_rps=rounded(normal_rps[0], 3) if normal_rps else None,
        normal_phase_rps=rounded(normal_rps[1], 3) if len(normal_rps) > 1 else None,
        capacity_share=CAPACITY_SHARE,
        throttled_capacity_rps=rounded(capacity_rps, 3),
        max_tokens=MAX_TOKENS,
        max_attempts=MAX_ATTEMPTS,
        baseline_backoff_s=BACKOFF_S,
        sluice_flow=SLUICE_FLOW,
        target_goodput_ratio_vs_backoff=TARGET_GOODPUT_RATIO,
        target_attempts_per_success=TARGET_ATTEMPTS_PER_SUCCESS,
    )
    return result


def fmt(value: Any) -> str:
    return "-" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def print_table(result: dict[str, Any]) -> None:
    print(
        f"closed loop: {result['agents']} agents, each running chains of"
        f" {result['steps_per_run']} llm steps back to back, over 4 phases of"
        f" {result['phase_s']:g} s (normal-phase rate {fmt(result['baseline_normal_phase_rps'])}"
        f" requests/s, throttled capacity {fmt(result['throttled_capacity_rps'])} requests/s)"
    )
    rows = [
        ("goodput tokens/s", "goodput_tokens_per_s"),
        ("  in throttled+outage", "fault_window_goodput_tokens_per_s"),
        ("provider calls", "calls"),
        ("attempts per success", "attempts_per_success"),
        ("p50 step latency s", "p50_step_latency_s"),
        ("p99 step latency s", "p99_step_latency_s"),
        ("failed llm steps", "failed_steps"),
        ("failed runs", "failed_runs"),
        ("runs started", "runs"),
        ("succeeded runs", "succeeded_runs"),
        ("unfinished at the end", "unfinished_runs"),
        ("429 answers", "calls_429"),
        ("5xx answers", "calls_5xx"),
        ("wall s", "wall_s"),
    ]
    print(f"{'':24}{'sluice':>12}{'backoff':>12}")
    for label, key in rows:
        print(f"{label:24}{fmt(result[key]):>12}{fmt(result['baseline_' + key]):>12}")
    print(
        f"served by the fallback: {result['served_by_fallback']}"
        f" (primary passed over for: {result['fallback_reasons']})"
    )
    print(f"{'phase':12}{'mode':>10}{'calls':>8}{'429':>8}{'5xx':>8}{'done':>8}{'tokens':>8}")
    for name, key in (("sluice", "phases"), ("backoff", "baseline_phases")):
        for p in result[key]:
            print(
                f"{p['phase']:12}{name:>10}{p['primary_calls']:>8}{fmt(p['share_429']):>8}"
                f"{fmt(p['share_5xx']):>8}{p['done_steps']:>8}{p['done_tokens']:>8}"
            )
    print(
        f"goodput ratio {fmt(result['goodput_ratio_vs_backoff'])} (target ≥"
        f" {TARGET_GOODPUT_RATIO:g}), attempts per success"
        f" {fmt(result['attempts_per_success'])} (target ≤ {TARGET_ATTEMPTS_PER_SUCCESS:g})"
    )


def warm_up(versions: list[Any]) -> None:
    """One run per graph before any clock starts, so each engine and connection exists."""
    from apps.runs.services import start_run
    from tests.runs.helpers import wait_for_run

    for version in versions:
        run = wait_for_run(start_run(version=version, payload={"q": "warm"}, actor="bench"))
        if run.status != "succeeded":
            raise RuntimeError(f"the warm-up run ended {run.status}: {run.error}")


def measure(size: Size, profile: FaultProfile, fakes: list[FakeOpenAI]) -> dict[str, Any]:
    from apps.graphs.services import create_graph
    from apps.tenants.context import tenant_context
    from apps.tenants.services import create_tenant

    tenant = create_tenant(slug="bench", name="Bench", actor="bench")
    with tenant_context(tenant):
        modes = [
            Mode(name, create_graph(slug=name, name=name, spec=spec, actor="bench").live_version())
            for name, spec in (
                ("baseline", chain_spec("base-primary", size.steps)),
                ("sluice", chain_spec("storm-primary", size.steps)),
            )
        ]
        warm_up([mode.version for mode in modes])
        for mode in modes:
            drive(mode, size, profile, fakes)
            print(
                f"{mode.name}: {len(mode.run_ids)} runs, {len(mode.unfinished)} unfinished,"
                f" {len(mode.requests)} provider calls"
            )
    base, ours = (mode_figures(mode, profile) for mode in modes)
    return summarize(size, profile, base, ours)


@contextmanager
def registered(models: dict[str, Any]) -> Iterator[None]:
    """The storm models for the workers started inside (environment) and for this process
    (settings: graph validation and step queues), whatever settings it loaded before."""
    from django.test import override_settings

    from workers.inference.registry import platform_models

    os.environ["SLUICE_MODELS"] = json.dumps(models)
    try:
        with override_settings(SLUICE_MODELS=models):
            platform_models.cache_clear()
            yield
    finally:
        platform_models.cache_clear()
        os.environ.pop("SLUICE_MODELS", None)


def main(*, quick: bool) -> int:
    size = QUICK if quick else FULL
    profile = FaultProfile(size.phase_s)
    primary = FakeOpenAI(
        tokens_per_s=TOKENS_PER_S, ttft_s=TTFT_S, answer_words=MAX_TOKENS, faults=profile
    )
    backup = FakeOpenAI(tokens_per_s=TOKENS_PER_S, ttft_s=TTFT_S, answer_words=MAX_TOKENS)
    with primary, backup, services("storm") as root, registered(registry(primary, backup)):
        gpu = worker(root, "gpu", ["gpu"], [], concurrency=GPU_THREADS, pool="threads")
        try:
            with beat(root), worker(root, "cpu", CPU_WORKER_QUEUES, [], concurrency=2), gpu:
                result = measure(size, profile, [primary, backup])
        finally:
            logs = keep_logs(root)
    print_table(result)
    print(f"worker logs: {logs}")
    print("RESULT " + json.dumps(result))
    return 0
