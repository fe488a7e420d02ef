"""Cancel, deadline and lost messages, against real worker and beat processes."""

from unittest import mock

import pytest

from apps.runs.models import ResultRow, RunStatus, Step, StepStatus
from apps.runs.services import cancel_run, start_run
from apps.tenants.context import tenant_context
from tests.conftest import World
from tests.runs.helpers import wait_for_run, wait_until

pytestmark = [pytest.mark.workers, pytest.mark.django_db(transaction=True)]

SLOW_SPEC = {
    "nodes": [
        {"id": "in", "type": "source.manual"},
        {"id": "split", "type": "fanout.split", "config": {"field": "items"}},
        # About five seconds per item at the test engine's 400 tokens/s.
        {
            "id": "gen",
            "type": "llm.generate",
            "config": {"prompt": "{{ item }}", "max_tokens": 2000},
        },
        {"id": "store", "type": "sink.table", "config": {"table": "slow"}},
    ],
    "edges": [["in", "split"], ["split", "gen"], ["gen", "store"]],
}


def test_cancel_skips_waiting_steps_and_stops_running_ones(world: World, platform: object) -> None:
    graph = world.graph("slow", SLOW_SPEC)
    with tenant_context(world.acme):
        run = start_run(
            version=graph.live_version(), payload={"items": list(range(12))}, actor=world.owner
        )
        gen = Step.objects.filter(run=run, node_id="gen")
        wait_until(
            lambda: gen.filter(status=StepStatus.RUNNING).exists(), 30, "a running generation"
        )
        assert cancel_run(run, actor=world.operator)
        run.refresh_from_db()
        assert run.status == RunStatus.CANCELLED and run.error == "cancelled by operator"
        # Running generations notice at their next heartbeat and commit nothing.
        wait_until(
            lambda: not gen.filter(status=StepStatus.RUNNING).exists(), 10, "generations to stop"
        )
        statuses = set(gen.values_list("status", flat=True))
        assert statuses == {StepStatus.SKIPPED}
        reasons = set(gen.values_list("skip_reason", flat=True))
        # Waiting steps are skipped by the cancel itself, or by a worker that was claiming one
        # at that moment ("run cancelled"); running ones stop in the engine.
        assert reasons <= {"cancelled by operator", "run cancelled", "run cancelled while running"}
        assert "run cancelled while running" in reasons
        assert not ResultRow.objects.filter(run=run).exists()
        run.refresh_from_db()
        assert run.open_steps == 0 and run.status == RunStatus.CANCELLED
        assert not cancel_run(run, actor=world.operator)  # already ended


def test_deadline_stops_the_run_and_fails_it(world: World, platform: object) -> None:
    spec = {**SLOW_SPEC, "policies": {"ttl_s": 1}}
    graph = world.graph("deadline", spec)
    with tenant_context(world.acme):
        run = start_run(version=graph.live_version(), payload={"items": [1, 2]}, actor=world.owner)
    run = wait_for_run(run, timeout=30)
    with tenant_context(world.acme):
        assert run.status == RunStatus.FAILED and run.error == "deadline passed"
        wait_until(
            lambda: not Step.objects.filter(run=run, status=StepStatus.RUNNING).exists(), 10, "stop"
        )
        gen = Step.objects.filter(run=run, node_id="gen")
        # Whoever notices first: a claim, a heartbeat, the sweeper, or a commit that finds the
        # run already failed.
        assert set(gen.values_list("skip_reason", flat=True)) <= {
            "deadline",
            "run failed while running",
        }
        assert not ResultRow.objects.filter(run=run).exists()


def test_a_lost_message_is_resent_by_the_sweeper(world: World, platform: object) -> None:
    spec = {
        "nodes": [
            {"id": "in", "type": "source.manual"},
            {"id": "store", "type": "sink.table", "config": {"table": "kept"}},
        ],
        "edges": [["in", "store"]],
    }
    graph = world.graph("lossy", spec)
    with tenant_context(world.acme), mock.patch("apps.runs.engine.outbox.send_now") as lost:
        run = start_run(version=graph.live_version(), payload={"n": 1}, actor=world.owner)
    assert lost.call_count == 1  # the broker never saw it
    run = wait_for_run(run, timeout=30)
    with tenant_context(world.acme):
        assert run.status == RunStatus.SUCCEEDED
        assert [row.data for row in ResultRow.objects.filter(run=run)] == [{"n": 1}]
