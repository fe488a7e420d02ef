"""Driving the step engine in process: claim and run steps here, with no worker and no
broker, so a test can stop between any two commits and look at the rows."""

from dataclasses import dataclass
from typing import Any

from django.db.models import Q
from django.utils import timezone

from apps.runs.engine.context import Claimed
from apps.runs.engine.execute import claim_step, run_claimed
from apps.runs.models import CLAIMABLE_STEP_STATUSES, FINAL_STEP_STATUSES, Run, Step
from apps.runs.services import start_run
from apps.tenants.context import tenant_context
from tests.conftest import World

WORKER = "test-worker"

# source -> split (one step per item) -> shape -> gather (collect by split) -> store
FANOUT_SPEC: dict[str, Any] = {
    "nodes": [
        {"id": "in", "type": "source.manual"},
        {"id": "split", "type": "fanout.split", "config": {"field": "items"}},
        {
            "id": "shape",
            "type": "transform.template",
            "config": {"template": "{{ item.name | upper }}-{{ index }}", "output": "loud"},
        },
        {"id": "gather", "type": "collect", "config": {"by": "split"}},
        {"id": "store", "type": "sink.table", "config": {"table": "gathered"}},
    ],
    "edges": [["in", "split"], ["split", "shape"], ["shape", "gather"], ["gather", "store"]],
}


def source_only(**node: Any) -> dict[str, Any]:
    """A graph of one source node (with `retry`, `ttl_s`, ...) and `policies`, if given."""
    policies = node.pop("policies", None)
    spec: dict[str, Any] = {"nodes": [{"id": "in", "type": "source.manual", **node}], "edges": []}
    if policies is not None:
        spec["policies"] = policies
    return spec


def begin(world: World, slug: str, spec: dict[str, Any], payload: dict[str, Any]) -> Run:
    graph = world.graph(slug, spec)
    with tenant_context(world.acme):
        return start_run(version=graph.live_version(), payload=payload, actor=world.owner)


def claim(step: Step, worker: str = WORKER) -> Claimed:
    claimed = claim_step(step.id, worker)
    assert claimed is not None, f"{step} was not claimed"
    return claimed


def only_step(run: Run, node_id: str, item: int | None = None) -> Step:
    return Step.objects.get(run=run, node_id=node_id, item_index=item)


def unfinished(run: Run) -> int:
    return Step.objects.filter(run=run).exclude(status__in=FINAL_STEP_STATUSES).count()


@dataclass(frozen=True)
class Tick:
    """The run as it stood right after one step's attempt ended."""

    node: str
    item: int | None
    open_steps: int
    unfinished: int
    status: str


def ready(run: Run) -> list[Step]:
    due = Q(not_before__isnull=True) | Q(not_before__lte=timezone.now())
    return list(Step.objects.filter(due, run=run, status__in=CLAIMABLE_STEP_STATUSES))


def drain(
    run: Run, *, last_item_first: bool = False, until: str | None = None, limit: int = 100
) -> list[Tick]:
    """Claims and runs the run's due steps one at a time, as a worker would, until none is
    left (or the next one is of node `until`). `last_item_first` takes a fan-out's items
    from the highest index down, so arrival order differs from item order."""
    ticks: list[Tick] = []
    with tenant_context(run.tenant):
        for _ in range(limit):
            steps = ready(run)
            if not steps:
                return ticks
            step = (
                max(steps, key=lambda s: -1 if s.item_index is None else s.item_index)
                if last_item_first
                else steps[0]
            )
            if step.node_id == until:
                return ticks
            run_claimed(claim(step), inline_queue=None)
            run.refresh_from_db()
            ticks.append(
                Tick(step.node_id, step.item_index, run.open_steps, unfinished(run), run.status)
            )
    raise AssertionError(f"run {run.id} still had steps to run after {limit}")
