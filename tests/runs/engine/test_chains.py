"""Chains in process: cheap steps after a step on the worker's own queue run back to back and
commit in one transaction, each with its own step row and events; a crash in the middle
leaves nothing of the chain but its first step, which the sweeper runs again."""

import itertools
from datetime import timedelta
from typing import Any
from unittest import mock

import pytest
from django.utils import timezone

from apps.runs.engine import chains
from apps.runs.engine.execute import run_claimed
from apps.runs.engine.outbox import StepMessage
from apps.runs.engine.sweeper import release_expired_lease
from apps.runs.models import Event, ResultRow, RunStatus, Step, StepStatus
from apps.tenants.context import tenant_context
from tests.conftest import World
from tests.runs.engine.helpers import begin, claim, drain, only_step

NODES = ["in", "a", "b", "store"]


def linear(**b_node: Any) -> dict[str, Any]:
    """in -> a -> b -> store: every node cheap, all on the cpu queue."""
    return {
        "nodes": [
            {"id": "in", "type": "source.manual"},
            {"id": "a", "type": "transform.template", "config": {"template": "{{ n + 1 }}"}},
            {
                "id": "b",
                "type": "transform.template",
                "config": {"template": "{{ text }}!"},
                **b_node,
            },
            {"id": "store", "type": "sink.table", "config": {"table": "chained"}},
        ],
        "edges": [["in", "a"], ["a", "b"], ["b", "store"]],
    }


class Crash(BaseException):
    """The worker dying: not an Exception, so no handler in the engine catches it."""


@pytest.mark.django_db
def test_a_chain_commits_every_cheap_step_at_once_each_with_its_row_and_events(
    world: World, sent: list[StepMessage], django_capture_on_commit_callbacks: Any
) -> None:
    run = begin(world, "chain", linear(), {"n": 1})
    with tenant_context(world.acme), django_capture_on_commit_callbacks(execute=True):
        sent.clear()
        following = run_claimed(claim(only_step(run, "in")), inline_queue="cpu")
        assert following is None
        steps = {s.node_id: s for s in Step.objects.filter(run=run)}
        assert sorted(steps) == sorted(NODES)
        assert {s.status for s in steps.values()} == {StepStatus.DONE}
        assert all(s.attempt == 1 and s.duration_ms is not None for s in steps.values())
        # Lineage as without the chain: each step consumed its predecessor's one output.
        for upstream, node in itertools.pairwise(NODES):
            produced = Event.objects.get(producer=steps[upstream])
            assert steps[node].inputs == [produced.id]
        assert ResultRow.objects.get(run=run).data["text"] == "2!"
        run.refresh_from_db()
        assert (run.status, run.open_steps) == (RunStatus.SUCCEEDED, 0)
    assert sent == []  # no broker hop anywhere in the chain


@pytest.mark.django_db
def test_a_node_that_sets_chain_false_gets_its_own_step_leased_to_this_worker(
    world: World,
) -> None:
    run = begin(world, "unchained", linear(chain=False), {"n": 1})
    with tenant_context(world.acme):
        following = run_claimed(claim(only_step(run, "in")), inline_queue="cpu")
        assert following is not None and following.step.node_id == "b"
        b = only_step(run, "b")
        assert (b.status, b.lease_token) == (StepStatus.RUNNING, following.token)
        assert only_step(run, "a").status == StepStatus.DONE
        # b is not part of any chain: the step after it comes by the fast path, not chained.
        store = run_claimed(following, inline_queue="cpu")
        assert store is not None and store.step.node_id == "store"
        assert run_claimed(store, inline_queue="cpu") is None
        assert only_step(run, "store").status == StepStatus.DONE


@pytest.mark.django_db
def test_without_an_own_queue_nothing_chains(world: World) -> None:
    run = begin(world, "no-queue", linear(), {"n": 1})
    with tenant_context(world.acme):
        assert run_claimed(claim(only_step(run, "in")), inline_queue=None) is None
        assert only_step(run, "a").status == StepStatus.QUEUED


@pytest.mark.django_db
def test_a_crash_in_the_middle_of_a_chain_leaves_nothing_and_the_chain_runs_again(
    world: World,
) -> None:
    run = begin(world, "crash", linear(), {"n": 1})
    real_plan = chains.plan
    with tenant_context(world.acme):
        first = claim(only_step(run, "in"))

        def dies_at_b(claimed: Any, result: Any) -> Any:
            if claimed.step.node_id == "b":
                raise Crash
            return real_plan(claimed, result)

        with mock.patch.object(chains, "plan", side_effect=dies_at_b), pytest.raises(Crash):
            run_claimed(first, inline_queue="cpu")
        # Nothing of the chain was written: the first step still holds its lease.
        assert list(Step.objects.filter(run=run).values_list("node_id", "status")) == [
            ("in", StepStatus.RUNNING)
        ]
        assert not Event.objects.filter(run=run).exclude(producer=None).exists()
        Step.objects.filter(id=first.step.id).update(lease_until=timezone.now() - timedelta(1))
        assert release_expired_lease(first.step.id) == 1
        source = only_step(run, "in")
        run_claimed(claim(source), inline_queue="cpu")
        assert {s.node_id: s.status for s in Step.objects.filter(run=run)} == dict.fromkeys(
            NODES, StepStatus.DONE
        )
        assert Event.objects.filter(run=run).exclude(producer=None).count() == len(NODES)
        assert ResultRow.objects.filter(run=run).count() == 1
        run.refresh_from_db()
        assert run.status == RunStatus.SUCCEEDED


@pytest.mark.django_db
def test_a_failing_chained_step_commits_the_chain_before_it_and_fails_like_any_step(
    world: World,
) -> None:
    spec = linear()
    spec["nodes"][2]["config"]["template"] = "{{ missing.field }}"
    run = begin(world, "breaks", spec, {"n": 1})
    with tenant_context(world.acme):
        run_claimed(claim(only_step(run, "in")), inline_queue="cpu")
        assert only_step(run, "a").status == StepStatus.DONE
        b = only_step(run, "b")
        assert b.status in (StepStatus.FAILED, StepStatus.DEAD)
        assert b.attempt == 1 and b.error
        drain(run)
        run.refresh_from_db()
        assert run.status == RunStatus.FAILED
        assert not Step.objects.filter(run=run, node_id="store").exists()
