"""A run's open_steps is the number of its steps not yet final, after every commit, and the
run ends exactly when it reaches zero."""

from typing import Any

import pytest

from apps.runs.models import ResultRow, RunStatus, Step
from apps.tenants.context import tenant_context
from tests.conftest import World
from tests.runs.engine.helpers import FANOUT_SPEC, Tick, begin, drain, only_step

# source -> split -> keep? (true: on to gather; anything else: dropped) -> gather -> store
SWITCH_SPEC: dict[str, Any] = {
    "nodes": [
        {"id": "in", "type": "source.manual"},
        {"id": "split", "type": "fanout.split", "config": {"field": "items"}},
        {
            "id": "keep",
            "type": "route.switch",
            "config": {"field": "item", "cases": {"true": "yes"}},
        },
        {"id": "gather", "type": "collect", "config": {"by": "split"}},
        {"id": "store", "type": "sink.table", "config": {"table": "kept"}},
    ],
    "edges": [["in", "split"], ["split", "keep"], ["keep", "gather", "yes"], ["gather", "store"]],
}


def assert_counted(ticks: list[Tick]) -> None:
    for tick in ticks:
        assert tick.open_steps == tick.unfinished, tick
    *before, last = ticks
    assert all(t.open_steps > 0 and t.status == RunStatus.RUNNING for t in before)
    assert (last.open_steps, last.unfinished, last.status) == (0, 0, RunStatus.SUCCEEDED)


@pytest.mark.django_db
def test_open_steps_counts_the_unfinished_steps_after_every_commit(world: World) -> None:
    run = begin(world, "count", FANOUT_SPEC, {"items": [{"name": "a"}, {"name": "b"}]})
    with tenant_context(world.acme):
        run.refresh_from_db()
        assert (run.open_steps, run.status) == (1, RunStatus.QUEUED)
    ticks = drain(run)
    assert [t.open_steps for t in ticks] == [1, 2, 1, 1, 1, 0]
    assert_counted(ticks)


@pytest.mark.django_db
def test_items_routed_nowhere_end_without_holding_the_run_open(world: World) -> None:
    run = begin(world, "count-switch", SWITCH_SPEC, {"items": [True, False, True, "x"]})
    ticks = drain(run, last_item_first=True)
    assert_counted(ticks)
    with tenant_context(world.acme):
        assert Step.objects.filter(run=run, node_id="keep").count() == 4
        assert len(only_step(run, "gather").inputs) == 2
        (data,) = ResultRow.objects.filter(run=run).values_list("data", flat=True)
        assert data["items"] == [{"item": True, "index": 0}, {"item": True, "index": 2}]
