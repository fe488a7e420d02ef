"""Per-step overhead: N no-op items, each one run through a linear 5-stage graph (a manual
source and 4 templates, each set `chain: false` so that every step is claimed, committed
and messaged on its own, as a tool or LLM node's would be) on W worker processes, against
the baseline of a bare Celery chain of 5 no-op tasks per item on the same broker and
workers, interleaved round by round.

    python -m bench overhead [--quick]

Overhead of a step: its predecessor's commit to its own commit, less the operator's own
time (`Step.operator_ms`); `finished_at` is set in the committing transaction, so it stands
for the commit on both sides of the difference. PostgreSQL commits per step come from
`pg_stat_database.xact_commit` around the Sluice part of each round. Round trips per step
are counted once the workers have stopped, by running a few runs' steps in this process
with every SQL statement and transaction counted.
"""

import itertools
import json
import math
import statistics
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from bench.stack import services, worker
from workers.queues import CPU_WORKER_QUEUES

STAGES = 5
WORKERS = 2  # one prefork worker with this concurrency: the machine has 2 cores
POLL_S = 0.05
WARM_UP_ITEMS = 10
PART_TIMEOUT_S = 300.0
# A PostgreSQL 15 backend flushes its statistics at most once a second; one that goes idle
# with some still pending flushes them within PGSTAT_IDLE_INTERVAL (10 s). The workers keep
# their connections, so the count after a Sluice part is read only once they have been
# idle this long.
STATS_SETTLE_S = 11.0


def linear_spec(*, chain: bool = False) -> dict[str, Any]:
    nodes: list[dict[str, Any]] = [{"id": "in", "type": "source.manual"}]
    for i in range(STAGES - 1):
        nodes.append(
            {
                "id": f"t{i}",
                "type": "transform.template",
                "config": {"template": "{{ n }}", "output": "n"},
            }
        )
    if not chain:
        for node in nodes:
            node["chain"] = False
    edges = [[a["id"], b["id"]] for a, b in itertools.pairwise(nodes)]
    return {"nodes": nodes, "edges": edges}


@dataclass
class SluicePart:
    steps_per_s: float
    overhead_ms: list[float]  # one per non-source step
    start_ms: list[float]  # one per source step: the run's creation to its commit
    without_operator_ms: int  # steps whose operator_ms was missing, counted as 0
    commits: int  # PostgreSQL commits during the part, less this process's polling


class CommitCounter:
    """xact_commit of this database, less the transactions this process adds by reading it
    and by polling in between (each statement in autocommit is a transaction)."""

    def __init__(self) -> None:
        self.before = self.read()
        self.own = 1  # the SELECT of that read: it commits after its own snapshot

    @staticmethod
    def read() -> int:
        from django.db import connection

        with connection.cursor() as cursor:
            # This backend's own counts are flushed when it next goes idle: before the next
            # statement. Other backends flush on their own schedule (see STATS_SETTLE_S).
            cursor.execute("SELECT pg_stat_force_next_flush()")
            cursor.execute(
                "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
            )
            row = cursor.fetchone()
        if row is None:
            raise RuntimeError("pg_stat_database has no row for this database")
        return int(row[0])

    def since(self) -> int:
        self.own += 1  # the flush statement of this read
        return self.read() - self.before - self.own


def start_runs(version: Any, items: int) -> list[uuid.UUID]:
    from apps.runs.services import start_run

    return [start_run(version=version, payload={"n": i}, actor="bench").id for i in range(items)]


def wait_runs(counter: CommitCounter) -> None:
    """Polls until no run is queued or running. Each poll is one autocommit SELECT, that is
    one PostgreSQL commit: counted, so it is not charged to the steps."""
    from apps.runs.models import ACTIVE_RUN_STATUSES, Run

    deadline = time.monotonic() + PART_TIMEOUT_S
    while True:
        counter.own += 1
        if not Run.objects.filter(status__in=ACTIVE_RUN_STATUSES).exists():
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"runs still active after {PART_TIMEOUT_S:.0f} s")
        time.sleep(POLL_S)


def check_succeeded(run_ids: list[uuid.UUID]) -> None:
    from apps.runs.models import Run, RunStatus

    ended = Run.objects.filter(id__in=run_ids).exclude(status=RunStatus.SUCCEEDED)
    for status, error in ended.values_list("status", "error")[:1]:
        raise RuntimeError(f"a bench run ended {status}: {error}")


def measure_steps(run_ids: list[uuid.UUID], commits: int) -> SluicePart:
    """The part's rate and per-step overheads, from the rows, in three queries."""
    from apps.runs.models import Event, Run, Step

    runs = dict(Run.objects.filter(id__in=run_ids).values_list("id", "created_at"))
    producers = dict(Event.objects.filter(run_id__in=run_ids).values_list("id", "producer_id"))
    steps = list(
        Step.objects.filter(run_id__in=run_ids).values(
            "id", "run_id", "inputs", "finished_at", "operator_ms"
        )
    )
    if len(steps) != len(run_ids) * STAGES:
        raise RuntimeError(f"expected {len(run_ids) * STAGES} steps, found {len(steps)}")
    committed: dict[uuid.UUID, datetime] = {s["id"]: s["finished_at"] for s in steps}
    span = max(committed.values()) - min(runs.values())
    part = SluicePart(len(steps) / span.total_seconds(), [], [], 0, commits)
    for step in steps:
        operator_ms = step["operator_ms"]
        if operator_ms is None:
            part.without_operator_ms += 1
            operator_ms = 0.0
        producer = producers[step["inputs"][0]]
        since = runs[step["run_id"]] if producer is None else committed[producer]
        ms = (step["finished_at"] - since).total_seconds() * 1000 - operator_ms
        (part.start_ms if producer is None else part.overhead_ms).append(ms)
    return part


def celery_part(items: int) -> float:
    """Sends one chain of STAGES no-op tasks per item; returns tasks per second from the
    first send to the last chain's end."""
    import redis
    from celery import chain
    from django.conf import settings

    from bench.baseline_tasks import noop

    client = redis.Redis.from_url(settings.REDIS_URL)
    key = f"bench:{uuid.uuid4()}"
    links = [noop.si().set(queue="cpu") for _ in range(STAGES - 1)]
    last = noop.si(key).set(queue="cpu")
    first = time.time()
    for _ in range(items):
        chain(*links, last).apply_async()
    deadline = time.monotonic() + PART_TIMEOUT_S
    while int(client.get(key) or 0) < items:
        if time.monotonic() > deadline:
            raise RuntimeError(f"celery chains unfinished after {PART_TIMEOUT_S:.0f} s")
        time.sleep(POLL_S)
    ended = max(float(at) for at in client.lrange(f"{key}:at", 0, -1))
    return items * STAGES / (ended - first)


def sluice_then_celery(version: Any, items: int) -> tuple[SluicePart, float]:
    """One round: the Sluice part, then the Celery part. Celery's uses no PostgreSQL, so it
    runs while the workers' commit counts settle, and the count read after it holds the
    Sluice part's commits only. Starting on idle workers, both parts meet the same machine."""
    counter = CommitCounter()
    run_ids = start_runs(version, items)
    wait_runs(counter)
    settled = time.monotonic() + STATS_SETTLE_S
    celery_rate = celery_part(items)
    time.sleep(max(0.0, settled - time.monotonic()))
    commits = counter.since()
    check_succeeded(run_ids)
    return measure_steps(run_ids, commits), celery_rate


def round_trips_per_step(version: Any, runs: int = 20) -> tuple[float, float]:
    """(SQL statements, round trips) per step, running `runs` runs' steps in this process as
    a worker on the cpu queue would (the fast path included). A round trip is a statement,
    or the BEGIN or COMMIT of a transaction (psycopg sends each on its own)."""
    from django.db import connection

    from apps.runs import engine
    from apps.runs.models import Step

    run_ids = start_runs(version, runs)  # their messages wait in the broker: no worker left
    sources = list(Step.objects.filter(run_id__in=run_ids, node_id="in").values_list("id"))
    counted = {"statements": 0, "commits": 0}

    def count(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        counted["statements"] += 1
        return execute(sql, params, many, context)

    commit = connection.commit

    def counted_commit() -> None:
        counted["commits"] += 1
        commit()

    connection.commit = counted_commit  # type: ignore[method-assign]
    try:
        with connection.execute_wrapper(count):
            for (step_id,) in sources:
                engine.execute(step_id, "bench", own_queue="cpu")
    finally:
        del connection.commit
    steps = Step.objects.filter(run_id__in=run_ids, status="done").count()
    if steps != runs * STAGES:
        raise RuntimeError(f"expected {runs * STAGES} done steps, found {steps}")
    statements = counted["statements"] / steps
    return statements, statements + 2 * counted["commits"] / steps


def percentile(values: list[float], q: float) -> float:
    """Nearest rank: the smallest value with at least q% of the values at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def summarize(items: int, parts: list[SluicePart], celery: list[float]) -> dict[str, Any]:
    sluice_rate = statistics.median(p.steps_per_s for p in parts)
    celery_rate = statistics.median(celery)
    overhead = [ms for p in parts for ms in p.overhead_ms]
    steps = len(parts) * items * STAGES
    return {
        "bench": "overhead",
        "items": items,
        "stages": STAGES,
        "workers": WORKERS,
        "rounds": len(parts),
        "sluice_steps_per_s": round(sluice_rate, 1),
        "celery_tasks_per_s": round(celery_rate, 1),
        "ratio_vs_celery": round(sluice_rate / celery_rate, 3),
        "overhead_ms_p50": round(percentile(overhead, 50), 3),
        "overhead_ms_p99": round(percentile(overhead, 99), 3),
        "start_ms_p50": round(percentile([ms for p in parts for ms in p.start_ms], 50), 3),
        "pg_commits_per_step": round(sum(p.commits for p in parts) / steps, 3),
        "steps_without_operator_ms": sum(p.without_operator_ms for p in parts),
    }


def print_table(parts: list[SluicePart], celery: list[float], result: dict[str, Any]) -> None:
    print(
        f"{'round':>6}{'sluice steps/s':>16}{'celery tasks/s':>16}{'ratio':>8}"
        f"{'overhead p50 ms':>17}{'p99 ms':>9}{'pg commits/step':>17}"
    )
    for i, (part, rate) in enumerate(zip(parts, celery, strict=True), 1):
        print(
            f"{i:>6}{part.steps_per_s:>16.1f}{rate:>16.1f}{part.steps_per_s / rate:>8.3f}"
            f"{percentile(part.overhead_ms, 50):>17.3f}{percentile(part.overhead_ms, 99):>9.3f}"
            f"{part.commits / (len(part.start_ms) * STAGES):>17.3f}"
        )
    print(
        f"{'all':>6}{result['sluice_steps_per_s']:>16}{result['celery_tasks_per_s']:>16}"
        f"{result['ratio_vs_celery']:>8}{result['overhead_ms_p50']:>17}"
        f"{result['overhead_ms_p99']:>9}{result['pg_commits_per_step']:>17}"
    )
    print("rates: medians over rounds; overhead percentiles: over every step of every round")
    print(
        f"start (run created to its source step's commit, broker queueing included):"
        f" p50 {result['start_ms_p50']} ms"
    )
    print(
        "pg commits include the one start_run transaction per run"
        f" ({1 / STAGES:.2f} per step); this process's polling is taken out"
    )
    lacking = result["steps_without_operator_ms"]
    total = len(parts) * len(parts[0].start_ms) * STAGES
    print(
        f"{lacking} of {total} steps had no operator_ms (counted as 0, so their operator's"
        " own time is inside the overhead figures)"
    )


def main(*, quick: bool) -> int:
    rounds, items = (2, 100) if quick else (3, 1000)
    with services("overhead") as root:
        from apps.graphs.services import create_graph
        from apps.tenants.context import tenant_context
        from apps.tenants.services import create_tenant

        tenant = create_tenant(slug="bench", name="Bench", actor="bench")
        with tenant_context(tenant):
            graph = create_graph(slug="linear", name="Linear", spec=linear_spec(), actor="bench")
            version = graph.live_version()
        with (
            worker(
                root,
                "cpu",
                CPU_WORKER_QUEUES,
                ["--include", "bench.baseline_tasks"],
                concurrency=WORKERS,
            ),
            tenant_context(tenant),
        ):
            sluice_then_celery(version, WARM_UP_ITEMS)
            measured = [sluice_then_celery(version, items) for _ in range(rounds)]
        with tenant_context(tenant):  # the workers have stopped: nobody else takes the steps
            statements, round_trips = round_trips_per_step(version)
    parts, celery = [p for p, _ in measured], [c for _, c in measured]
    result = summarize(items, parts, celery)
    result["sql_statements_per_step"] = round(statements, 2)
    result["round_trips_per_step"] = round(round_trips, 2)
    print_table(parts, celery, result)
    print(
        f"in process, per step: {result['sql_statements_per_step']} SQL statements,"
        f" {result['round_trips_per_step']} round trips (statements, BEGINs and COMMITs)"
    )
    print("RESULT " + json.dumps(result))
    return 0
