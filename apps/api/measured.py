"""What the platform has measured, for estimates and beside them: its capacity (the
parallelism the workers are started with), a graph's history (what its nodes' done steps
took lately), and a run's actual figures in the estimate's shape."""

from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db.models import Avg, Count, FloatField, OuterRef, Subquery, Sum
from django.utils import timezone

from apps.graphs.models import GraphVersion
from apps.runs.models import Run, Step, StepStatus, Usage
from sluice.env import env_int

JSON = dict[str, Any]

HISTORY_DAYS = 30  # how far back a graph's done steps count as its history
DEFAULT_CPU_CONCURRENCY = 2  # sluice/launcher.py starts the cpu worker with this many
DEFAULT_GPU_CONCURRENCY = 32  # ... and the GPU worker with SLUICE_GPU_CONCURRENCY or this
MICRODOLLAR = Decimal("0.000001")


@dataclass(frozen=True)
class NodeHistory:
    """What one node's done steps looked like lately; averages are None when not measured."""

    steps: int
    avg_tokens_out: float | None
    avg_duration_ms: float | None
    avg_engine_seconds: float | None  # summed over a step's attempts, from Usage


@dataclass(frozen=True)
class Capacity:
    cpu_concurrency: int  # cpu steps at once
    gpu_concurrency: int  # GPU worker threads, shared by the gpu and gpu.<model> queues
    ttft_ms: float  # the simulated engine's defaults (a model's params may change them)
    tokens_per_s: float
    batch_capacity: int  # sequences one engine decodes at full speed


def current_capacity() -> Capacity:
    return Capacity(
        cpu_concurrency=env_int("SLUICE_CPU_CONCURRENCY", DEFAULT_CPU_CONCURRENCY, minimum=1),
        gpu_concurrency=env_int("SLUICE_GPU_CONCURRENCY", DEFAULT_GPU_CONCURRENCY, minimum=1),
        ttft_ms=settings.SLUICE_SIM_TTFT_MS,
        tokens_per_s=settings.SLUICE_SIM_TOKENS_PER_S,
        batch_capacity=settings.SLUICE_SIM_BATCH_CAPACITY,
    )


def load_history(version: GraphVersion) -> dict[str, NodeHistory]:
    """Per node of `version`: its graph's done steps of the last HISTORY_DAYS, any version,
    in one aggregate query. A node id whose type has changed since has no history."""
    since = timezone.now() - timedelta(days=HISTORY_DAYS)
    engine = (
        Usage.objects.filter(step=OuterRef("pk"))
        .values("step")
        .annotate(seconds=Sum("engine_seconds"))
        .values("seconds")
    )
    rows = (
        Step.objects.filter(
            status=StepStatus.DONE,
            run__graph_version__graph_id=version.graph_id,
            finished_at__gte=since,
        )
        .annotate(engine_s=Subquery(engine, output_field=FloatField()))
        .values("node_id", "node_type")
        .annotate(
            count=Count("id"),
            tokens_out=Avg("tokens_out"),
            duration_ms=Avg("duration_ms"),
            engine_seconds=Avg("engine_s"),
        )
        .order_by()
    )
    types = {node["id"]: node["type"] for node in version.spec["nodes"]}
    return {
        row["node_id"]: NodeHistory(
            row["count"], row["tokens_out"], row["duration_ms"], row["engine_seconds"]
        )
        for row in rows
        if types.get(row["node_id"]) == row["node_type"]
    }


def money(amount: Decimal) -> str:
    return format(amount.quantize(MICRODOLLAR), "f")


def step_totals(run: Run) -> list[JSON]:
    """The run's steps grouped by node and status, with their attempts, tokens and cost:
    the one query both a run's detail and its actual figures are read from."""
    return list(
        Step.objects.filter(run_id=run.id)
        .values("node_id", "status")
        .annotate(
            n=Count("id"),
            attempts=Sum("attempt"),
            tokens_in=Sum("tokens_in"),
            tokens_out=Sum("tokens_out"),
            wasted=Sum("wasted_tokens"),
            cost=Sum("cost_usd"),
        )
        .order_by()
    )


def actual_for_run(run: Run, rows: list[JSON] | None = None) -> JSON:
    """A run's figures so far in the estimate's shape, plus its attempts and whether it has
    finished, from `step_totals` (read here if not given). Inside the run's tenant_context."""
    rows = step_totals(run) if rows is None else rows
    per_node = {node["id"]: 0 for node in run.spec["nodes"]}
    attempts = dict(per_node)
    for row in rows:
        per_node[row["node_id"]] += row["n"]
        attempts[row["node_id"]] += row["attempts"] or 0
    cost = sum((row["cost"] or Decimal(0) for row in rows), Decimal(0))
    engine = Usage.objects.filter(run=run).aggregate(seconds=Sum("engine_seconds"))["seconds"]
    end = run.finished_at or timezone.now()
    return {
        "steps": {"total": sum(per_node.values()), "per_node": per_node},
        "attempts": {"total": sum(attempts.values()), "per_node": attempts},
        "tokens": {
            "in": sum(row["tokens_in"] or 0 for row in rows),
            "out": sum(row["tokens_out"] or 0 for row in rows),
        },
        "gpu_seconds": round(engine or 0.0, 3),
        "cost_usd": money(cost),
        "wall_seconds": round((end - run.created_at).total_seconds(), 3),
        "assumptions": [],
        "finished": not run.is_active,
    }
