"""The chaos scenario shared by tests/runs/test_chaos.py and `python -m bench chaos`.

Items flow through a 5-stage graph whose stage 3 calls a loopback service that records each
Idempotency-Key. While the run is going, whole worker processes (the main process and its
pool children) are SIGKILLed, each at a point of progress, and replaced by a fresh worker.
The report says what was lost or duplicated, and how long affected items waited.
"""

import os
import random
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.utils import timezone

from apps.graphs.models import GraphVersion
from apps.runs.models import Effect, ResultRow, Run, Step, StepStatus
from apps.runs.services import start_run
from apps.tenants.context import tenant_context
from tests.harness.effect_service import EffectService

RESULTS_TABLE = "chaos_results"

# Starts a worker with the given name and returns its process once it is ready.
WorkerStarter = Callable[[str], subprocess.Popen[bytes]]


def chaos_spec(service_url: str, items: int) -> dict[str, Any]:
    return {
        "nodes": [
            {"id": "in", "type": "source.manual"},
            {"id": "split", "type": "fanout.split", "config": {"field": "items"}},
            {
                "id": "charge",
                "type": "tool.http",
                "config": {"url": service_url + "/ok", "output": "receipt"},
                "retry": {"max_attempts": 10, "backoff_s": 0.2},
            },
            {
                "id": "shape",
                "type": "transform.template",
                "config": {"template": "{{ item }}:{{ receipt.n }}", "output": "line"},
            },
            {"id": "store", "type": "sink.table", "config": {"table": RESULTS_TABLE}},
        ],
        "edges": [["in", "split"], ["split", "charge"], ["charge", "shape"], ["shape", "store"]],
        "policies": {"max_fanout": max(items, 1000)},
    }


@dataclass
class Kill:
    at: datetime
    worker: str
    affected: dict[str, int] = field(default_factory=dict)  # running step id -> its attempt


@dataclass
class ChaosReport:
    items: int
    run_status: str
    run_error: str
    kills: list[Kill]
    lost: int
    duplicate_outputs: int
    duplicate_effects: int
    effects_performed: int
    replays_deduplicated: int
    ledger_calls: int
    recovery_s: list[float]


class WorkerPool:
    """Named workers that can be killed at random and replaced by fresh ones."""

    def __init__(self, start: WorkerStarter, names: list[str]) -> None:
        self.start = start
        self.generation = 0
        self.workers = {name: start(name) for name in names}

    def kill_random(self, rng: random.Random) -> str:
        name = rng.choice(sorted(self.workers))
        proc = self.workers.pop(name)
        os.killpg(proc.pid, signal.SIGKILL)  # the whole worker: main process and pool
        proc.wait(timeout=10)
        return name

    def replace(self, killed: str) -> None:
        self.generation += 1
        fresh = f"{killed.split('~')[0]}~{self.generation}"
        self.workers[fresh] = self.start(fresh)


def run_chaos(
    version: GraphVersion,
    actor: Any,
    service: EffectService,
    pool: WorkerPool,
    *,
    items: int,
    kills: int,
    seed: int = 7,
    timeout_s: float = 300,
) -> ChaosReport:
    """Starts the run and kills a random worker `kills` times, evenly over the calls the
    service performs, then waits for the run to end and counts."""
    rng = random.Random(seed)
    tenant = version.tenant
    with tenant_context(tenant):
        run = start_run(version=version, payload={"items": list(range(items))}, actor=actor)
    done: list[Kill] = []
    deadline = time.monotonic() + timeout_s
    for number in range(1, kills + 1):
        threshold = items * number // (kills + 1)
        while len(service.performed) < threshold and time.monotonic() < deadline:
            time.sleep(0.01)
        name = pool.kill_random(rng)
        done.append(_affected_by(run, name))
        pool.replace(name)
    with tenant_context(tenant):
        while time.monotonic() < deadline:
            run.refresh_from_db()
            if not run.is_active:
                break
            time.sleep(0.1)
        return _report(run, items, done, service)


def _affected_by(run: Run, worker: str) -> Kill:
    kill = Kill(at=timezone.now(), worker=worker)
    with tenant_context(run.tenant):
        running = Step.objects.filter(
            run=run, status=StepStatus.RUNNING, worker__startswith=f"{worker}@"
        )
        kill.affected = {
            str(step_id): attempt for step_id, attempt in running.values_list("id", "attempt")
        }
    return kill


def _report(run: Run, items: int, kills: list[Kill], service: EffectService) -> ChaosReport:
    rows = list(
        ResultRow.objects.filter(run=run, table=RESULTS_TABLE).values_list("data", flat=True)
    )
    per_item: dict[Any, int] = {}
    for data in rows:
        per_item[data["item"]] = per_item.get(data["item"], 0) + 1
    ledger = Effect.objects.filter(step__run=run, kind="tool.http")
    return ChaosReport(
        items=items,
        run_status=run.status,
        run_error=run.error,
        kills=kills,
        lost=sum(1 for item in range(items) if item not in per_item),
        duplicate_outputs=sum(count - 1 for count in per_item.values()),
        duplicate_effects=sum(count - 1 for count in service.performed.values()),
        effects_performed=len(service.performed),
        replays_deduplicated=service.replays,
        ledger_calls=sum(ledger.values_list("calls", flat=True)),
        recovery_s=_recoveries(run, kills),
    )


def _recoveries(run: Run, kills: list[Kill]) -> list[float]:
    """For each step a kill interrupted: the kill to that step's next attempt starting."""
    recoveries = []
    for kill in kills:
        for step in Step.objects.filter(id__in=list(kill.affected)):
            if step.attempt > kill.affected[str(step.id)] and step.started_at is not None:
                recoveries.append((step.started_at - kill.at).total_seconds())
    return recoveries
