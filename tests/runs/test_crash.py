"""A worker process killed with SIGKILL mid-run: the run still completes, and no step's
outputs or effects are committed twice."""

from collections.abc import Iterator

import pytest

from apps.runs.models import Event, ResultRow, RunStatus, Step, StepStatus, Usage
from apps.runs.services import start_run
from apps.tenants.context import tenant_context
from tests.conftest import World
from tests.harness.platform import Platform
from tests.runs.helpers import wait_for_run, wait_until
from workers.queues import CPU_WORKER_QUEUES

pytestmark = [pytest.mark.workers, pytest.mark.django_db(transaction=True)]

ITEMS = 20
# About one second per generation, so the kill lands while steps are mid-flight.
SLOW_ENGINE = {"SLUICE_SIM_TTFT_MS": "100", "SLUICE_SIM_TOKENS_PER_S": "30"}

SPEC = {
    "nodes": [
        {"id": "in", "type": "source.manual"},
        {"id": "split", "type": "fanout.split", "config": {"field": "items"}},
        {
            "id": "gen",
            "type": "llm.generate",
            "config": {"prompt": "Item {{ item }}", "max_tokens": 30},
        },
        {"id": "store", "type": "sink.table", "config": {"table": "generated"}},
        {"id": "gather", "type": "collect", "config": {"by": "split"}},
        {"id": "count", "type": "sink.table", "config": {"table": "totals"}},
    ],
    "edges": [
        ["in", "split"],
        ["split", "gen"],
        ["gen", "store"],
        ["gen", "gather"],
        ["gather", "count"],
    ],
}


@pytest.fixture
def crash_platform(django_db_setup: None) -> Iterator[Platform]:
    platform = Platform("crash")
    try:
        platform.start_worker("cpu", CPU_WORKER_QUEUES, pool="prefork", concurrency=2)
        platform.start_beat()
        yield platform
    finally:
        platform.stop()


def test_sigkilled_worker_mid_run_loses_nothing_and_duplicates_nothing(
    world: World, crash_platform: Platform
) -> None:
    graph = world.graph("crashy", SPEC)
    victim = crash_platform.start_worker("victim", ["gpu"], concurrency=4, env=SLOW_ENGINE)
    with tenant_context(world.acme):
        run = start_run(
            version=graph.live_version(), payload={"items": list(range(ITEMS))}, actor=world.owner
        )
        gen_steps = Step.objects.filter(run=run, node_id="gen")
        wait_until(
            lambda: (
                gen_steps.filter(status=StepStatus.DONE).count() >= 2
                and gen_steps.filter(status=StepStatus.RUNNING).exists()
            ),
            60,
            "some generations done and some running",
        )
        crash_platform.kill(victim)
        interrupted = set(gen_steps.filter(status=StepStatus.RUNNING).values_list("id", flat=True))
        assert interrupted, "the kill should land while generations are running"

    crash_platform.start_worker("rescuer", ["gpu"], concurrency=4, env=SLOW_ENGINE)
    run = wait_for_run(run, timeout=120)

    with tenant_context(world.acme):
        assert run.status == RunStatus.SUCCEEDED, run.error
        rows = ResultRow.objects.filter(run=run, table="generated")
        assert sorted(row.data["item"] for row in rows) == list(range(ITEMS))  # each item once
        assert ResultRow.objects.get(run=run, table="totals").data["count"] == ITEMS
        for step in gen_steps:
            assert step.status == StepStatus.DONE
            assert Event.objects.filter(producer=step).count() == 1
            assert Usage.objects.filter(step=step).count() == 1
        for step in gen_steps.filter(id__in=interrupted):
            # The lost attempt was counted, expired, and the step ran again elsewhere.
            assert step.attempt == 2
            assert step.worker.startswith("rescuer@")
            assert "worker victim@" in step.error and "lost (lease expired)" in step.error


def test_sigkilled_prefork_worker_during_a_fast_fanout_commits_each_item_once(
    world: World, django_db_setup: None
) -> None:
    """Short steps, so the kill lands among claims and commits rather than mid-generation."""
    spec = {
        "nodes": [
            {"id": "in", "type": "source.manual"},
            {"id": "split", "type": "fanout.split", "config": {"field": "items"}},
            {"id": "t", "type": "transform.template", "config": {"template": "{{ item }}"}},
            {"id": "store", "type": "sink.table", "config": {"table": "items"}},
        ],
        "edges": [["in", "split"], ["split", "t"], ["t", "store"]],
    }
    graph = world.graph("fast-crash", spec)
    platform = Platform("crash-prefork")
    try:
        platform.start_beat()
        victim = platform.start_worker("victim", CPU_WORKER_QUEUES, pool="prefork", concurrency=2)
        with tenant_context(world.acme):
            run = start_run(
                version=graph.live_version(), payload={"items": list(range(300))}, actor=world.owner
            )
            rows = ResultRow.objects.filter(run=run)
            wait_until(lambda: rows.count() >= 30, 60, "the first rows")
            platform.kill(victim)
            assert rows.count() < 300, "the kill should land before the fan-out is done"
        platform.start_worker("rescuer", CPU_WORKER_QUEUES, pool="prefork", concurrency=2)
        run = wait_for_run(run, timeout=120)
    finally:
        platform.stop()
    with tenant_context(world.acme):
        assert run.status == RunStatus.SUCCEEDED, run.error
        assert sorted(row.data["text"] for row in rows) == sorted(str(i) for i in range(300))
        for node_id in ("t", "store"):
            assert Step.objects.filter(run=run, node_id=node_id).count() == 300
        assert Event.objects.filter(run=run, producer__node_id="t").count() == 300
