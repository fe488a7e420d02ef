"""Stopping a run: the run, the skips of its waiting steps and the audit entry commit as
one; a step running at the time commits nothing when it ends; a stop is done once."""

from collections.abc import Callable
from typing import Any
from unittest import mock

import pytest

from apps.audit.models import AuditEntry
from apps.runs.engine import store
from apps.runs.engine.context import Claimed
from apps.runs.engine.execute import claim_step, fail_attempt, run_claimed
from apps.runs.engine.outbox import StepMessage
from apps.runs.engine.stop import stop_run
from apps.runs.models import Event, Run, RunStatus, Step, StepStatus
from apps.tenants.context import tenant_context
from tests.conftest import World
from tests.runs.engine.helpers import FANOUT_SPEC, WORKER, begin, claim, drain, only_step

ITEMS = [{"name": n} for n in "abcd"]


def halfway(world: World, slug: str) -> tuple[Run, Claimed]:
    """A run with four shape steps: 0 and 1 queued, 2 waiting for its retry, 3 running
    (its claim is returned)."""
    run = begin(world, slug, FANOUT_SPEC, {"items": ITEMS})
    drain(run, until="shape")
    with tenant_context(world.acme):
        fail_attempt(claim(only_step(run, "shape", 2)), "flaky", permanent=False)
        running = claim(only_step(run, "shape", 3))
        run.refresh_from_db()
    return run, running


def statuses(run: Run) -> list[tuple[int | None, str, str]]:
    rows = Step.objects.filter(run=run, node_id="shape").order_by("item_index")
    return list(rows.values_list("item_index", "status", "skip_reason"))


@pytest.mark.django_db
def test_a_stop_skips_the_waiting_steps_and_sends_nothing(
    world: World,
    sent: list[StepMessage],
    django_capture_on_commit_callbacks: Callable[..., Any],
) -> None:
    run, _ = halfway(world, "stop")
    with tenant_context(world.acme):
        assert run.open_steps == 4
        with django_capture_on_commit_callbacks(execute=True):
            stopped = stop_run(
                run, to=RunStatus.CANCELLED, reason="no longer needed", actor=world.owner
            )
        assert stopped is True
        assert sent == []
        assert statuses(run) == [
            (0, StepStatus.SKIPPED, "no longer needed"),
            (1, StepStatus.SKIPPED, "no longer needed"),
            (2, StepStatus.SKIPPED, "no longer needed"),
            (3, StepStatus.RUNNING, ""),  # hears of it at its heartbeat or its commit
        ]
        run.refresh_from_db()
        assert (run.status, run.open_steps, run.error) == (
            RunStatus.CANCELLED,
            1,
            "no longer needed",
        )
        assert run.finished_at is not None
        (entry,) = AuditEntry.objects.filter(target_type="run", target_id=str(run.id)).exclude(
            action="run.start"
        )
        assert (entry.action, entry.actor, entry.after) == (
            "run.cancel",
            world.owner,
            {"status": RunStatus.CANCELLED, "reason": "no longer needed"},
        )

        assert stop_run(run, to=RunStatus.CANCELLED, reason="again", actor=world.owner) is False
        assert AuditEntry.objects.filter(action="run.cancel", target_id=str(run.id)).count() == 1
        assert Step.objects.filter(run=run, skip_reason="again").count() == 0
        assert claim_step(only_step(run, "shape", 0).id, WORKER) is None


@pytest.mark.django_db
def test_the_step_running_through_a_stop_commits_nothing(world: World) -> None:
    run, running = halfway(world, "stop-running")
    with tenant_context(world.acme):
        stop_run(run, to=RunStatus.CANCELLED, reason="stop", actor=world.owner)
        # The worker holding item 3 finishes its operator and comes to commit.
        assert run_claimed(running, inline_queue=None) is None

        step = only_step(run, "shape", 3)
        assert (step.status, step.skip_reason) == (
            StepStatus.SKIPPED,
            "run cancelled while running",
        )
        assert not Event.objects.filter(producer=step).exists()
        assert not Step.objects.filter(run=run, node_id__in=["gather", "store"]).exists()
        run.refresh_from_db()
        assert (run.status, run.open_steps, run.failures) == (RunStatus.CANCELLED, 0, 0)


@pytest.mark.django_db
def test_a_stop_and_its_skips_commit_together_or_not_at_all(world: World) -> None:
    run, _ = halfway(world, "stop-atomic")
    with tenant_context(world.acme):
        before = statuses(run)

        def skip_then_crash(*args: Any, **kwargs: Any) -> int:
            store_skip(*args, **kwargs)
            raise ConnectionError("lost the database mid-stop")

        store_skip = store.skip_waiting
        with (
            mock.patch.object(store, "skip_waiting", side_effect=skip_then_crash),
            pytest.raises(ConnectionError),
        ):
            stop_run(run, to=RunStatus.CANCELLED, reason="stop", actor=world.owner)

        assert statuses(run) == before
        run.refresh_from_db()
        assert (run.status, run.open_steps, run.error) == (RunStatus.RUNNING, 4, "")
        assert not AuditEntry.objects.filter(action="run.cancel").exists()
