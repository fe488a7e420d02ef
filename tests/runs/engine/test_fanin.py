"""Fan-in arithmetic: a collect fires exactly once, when every item of its fan-out has
settled, with what arrived in item order; a failed item is either left out and listed
(collect_succeeded) or fails the run, naming the step (fail_run, the default)."""

import copy
from typing import Any

import pytest

from apps.runs.models import (
    Event,
    FanIn,
    FanInClosed,
    ResultRow,
    Run,
    RunStatus,
    Step,
    StepStatus,
)
from apps.tenants.context import tenant_context
from tests.conftest import World
from tests.runs.engine.helpers import FANOUT_SPEC, begin, drain, only_step

ITEMS = [{"name": "a"}, {"name": "b"}, {"name": "c"}]
UNDEFINED = "attempt 1/3: template: 'dict object' has no attribute 'name'"


def with_policy(policy: str) -> dict[str, Any]:
    spec = copy.deepcopy(FANOUT_SPEC)
    spec["nodes"][3]["config"]["on_item_failure"] = policy
    return spec


def fanin_of(run: Run) -> FanIn:
    return FanIn.objects.get(fanout_step=only_step(run, "split"))


@pytest.mark.django_db
def test_a_collect_gets_every_item_once_in_item_order(world: World) -> None:
    run = begin(world, "fanin", FANOUT_SPEC, {"items": ITEMS})
    ticks = drain(run, last_item_first=True)
    with tenant_context(world.acme):
        assert [(t.node, t.item) for t in ticks] == [
            ("in", None),
            ("split", None),
            ("shape", 2),
            ("shape", 1),
            ("shape", 0),
            ("gather", None),
            ("store", None),
        ]
        gather = only_step(run, "gather")
        arrived = list(Event.objects.filter(id__in=gather.inputs).values_list("id", "payload"))
        by_id = dict(arrived)
        # Its inputs are the three shaped items, in the order they arrived (last first) ...
        assert [by_id[i]["loud"] for i in gather.inputs] == ["C-2", "B-1", "A-0"]
        # ... and what it collected is in item order.
        (row,) = ResultRow.objects.filter(run=run).values_list("table", "data")
        assert row[0] == "gathered"
        assert [item["loud"] for item in row[1]["items"]] == ["A-0", "B-1", "C-2"]
        assert row[1]["count"] == 3 and "failures" not in row[1]

        fanin = fanin_of(run)
        assert (fanin.pending, fanin.failed, fanin.closed) == (0, 0, FanInClosed.COLLECTED)
        assert fanin.collect_step_id == gather.id and fanin.arrivals.count() == 3
        assert Step.objects.filter(run=run, node_id="gather").count() == 1
        run.refresh_from_db()
        assert (run.status, run.open_steps, run.failures) == (RunStatus.SUCCEEDED, 0, 0)


@pytest.mark.django_db
def test_an_empty_fanout_collects_an_empty_list_at_once(world: World) -> None:
    run = begin(world, "fanin-empty", FANOUT_SPEC, {"items": []})
    ticks = drain(run)
    with tenant_context(world.acme):
        # The split's own commit closes its fan-in: no item is left to wait for.
        assert [t.node for t in ticks] == ["in", "split", "gather", "store"]
        assert only_step(run, "gather").inputs == []
        (data,) = ResultRow.objects.filter(run=run).values_list("data", flat=True)
        assert data == {"items": [], "count": 0}
        fanin = fanin_of(run)
        assert (fanin.pending, fanin.closed) == (0, FanInClosed.COLLECTED)
        run.refresh_from_db()
        assert (run.status, run.open_steps) == (RunStatus.SUCCEEDED, 0)


@pytest.mark.django_db
def test_a_failed_item_is_left_out_and_listed_by_collect_succeeded(world: World) -> None:
    items = [{"name": "a"}, {}, {"name": "c"}]  # item 1 has no name: its template fails
    run = begin(world, "fanin-partial", with_policy("collect_succeeded"), {"items": items})
    drain(run)
    with tenant_context(world.acme):
        failed = only_step(run, "shape", 1)
        assert (failed.status, failed.attempt, failed.error) == (StepStatus.DEAD, 1, UNDEFINED)

        (data,) = ResultRow.objects.filter(run=run).values_list("data", flat=True)
        assert [item["loud"] for item in data["items"]] == ["A-0", "C-2"]
        assert data["count"] == 2
        assert data["failures"] == [
            {"index": 1, "node": "shape", "step": str(failed.id), "error": UNDEFINED}
        ]
        fanin = fanin_of(run)
        assert (fanin.pending, fanin.failed, fanin.closed) == (0, 1, FanInClosed.COLLECTED)
        run.refresh_from_db()
        # The collect absorbed the failure: it never reached the run.
        assert (run.status, run.open_steps, run.failures) == (RunStatus.SUCCEEDED, 0, 0)


@pytest.mark.django_db
def test_a_failed_item_fails_the_run_by_default(world: World) -> None:
    items = [{"name": "a"}, {"name": "b"}, {}]
    run = begin(world, "fanin-fail", FANOUT_SPEC, {"items": items})
    ticks = drain(run)
    with tenant_context(world.acme):
        assert [t.node for t in ticks] == ["in", "split", "shape", "shape", "shape"]
        assert not Step.objects.filter(run=run, node_id__in=["gather", "store"]).exists()
        assert not ResultRow.objects.filter(run=run).exists()
        fanin = fanin_of(run)
        assert (fanin.pending, fanin.failed, fanin.closed) == (0, 1, FanInClosed.FAILED)
        assert fanin.collect_step_id is None
        run.refresh_from_db()
        assert (run.status, run.open_steps, run.failures) == (RunStatus.FAILED, 0, 1)
        assert run.error == f"1 failed step: shape: {UNDEFINED}"
