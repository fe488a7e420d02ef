"""The effect ledger on its own, against PostgreSQL: a completed effect is never called
again, an unknown outcome is called again with the same key, and a worker without the lease
cannot call out. Also the retry delay's jitter bounds and the retry budget's decision."""

from typing import Any
from uuid import uuid4

import pytest

from apps.runs.engine import effects
from apps.runs.engine.retries import dead_or_retry
from apps.runs.engine.states import retry_delay_s
from apps.runs.engine.store import transition_step
from apps.runs.models import Effect, EffectStatus, Step, StepStatus
from apps.runs.services import start_run
from apps.tenants.context import tenant_context
from tests.conftest import World
from workers.operators.base import LeaseLost, PermanentError

pytestmark = pytest.mark.django_db

SPEC: dict[str, object] = {"nodes": [{"id": "in", "type": "source.manual"}], "edges": []}


class Calls:
    def __init__(self, *, fail: Exception | None = None) -> None:
        self.keys: list[str] = []
        self.fail = fail

    def __call__(self, key: str) -> dict[str, Any]:
        self.keys.append(key)
        if self.fail is not None:
            raise self.fail
        return {"charged": len(self.keys)}


def attempt(step: Step) -> Any:
    """Claims the step as a new attempt would (a fresh lease token) and returns the token."""
    token = uuid4()
    status = Step.objects.get(id=step.id).status
    if status == StepStatus.RUNNING:  # the previous attempt's worker died: lease expired
        transition_step(step, from_=(StepStatus.RUNNING,), to=StepStatus.QUEUED)
    transition_step(step, from_=(StepStatus.QUEUED,), to=StepStatus.RUNNING, lease_token=token)
    return token


@pytest.fixture
def step(world: World) -> Step:
    graph = world.graph("ledger", SPEC)
    with tenant_context(world.acme):
        run = start_run(version=graph.live_version(), payload={}, actor=world.owner)
        return Step.objects.get(run=run)


def test_a_completed_effect_is_not_called_again_on_a_rerun(world: World, step: Step) -> None:
    with tenant_context(world.acme):
        first, second = Calls(), Calls()
        assert effects.perform(step, attempt(step), "charge", {"amount": 5}, first) == {
            "charged": 1
        }
        # The worker died before committing the step; the re-run gets the recorded answer.
        assert effects.perform(step, attempt(step), "charge", {"amount": 5}, second) == {
            "charged": 1
        }
        assert len(first.keys) == 1 and second.keys == []
        effect = Effect.objects.get(step=step)
        assert effect.status == EffectStatus.DONE and effect.calls == 1
        assert effect.key == first.keys[0] and str(step.run_id) in effect.key


def test_an_unknown_outcome_is_called_again_with_the_same_key(world: World, step: Step) -> None:
    with tenant_context(world.acme):
        timed_out = Calls(fail=TimeoutError("no answer"))
        with pytest.raises(TimeoutError):
            effects.perform(step, attempt(step), "charge", {"amount": 5}, timed_out)
        assert Effect.objects.get(step=step).status == EffectStatus.PENDING
        retry = Calls()
        effects.perform(step, attempt(step), "charge", {"amount": 5}, retry)
        assert retry.keys == timed_out.keys  # same Idempotency-Key: the receiver dedupes
        effect = Effect.objects.get(step=step)
        assert effect.status == EffectStatus.DONE and effect.calls == 2


def test_a_permanent_failure_is_recorded_and_a_replay_may_call_again(
    world: World, step: Step
) -> None:
    with tenant_context(world.acme):
        with pytest.raises(PermanentError):
            effects.perform(
                step, attempt(step), "charge", {}, Calls(fail=PermanentError("card declined"))
            )
        effect = Effect.objects.get(step=step)
        assert effect.status == EffectStatus.FAILED and effect.error == "card declined"
        assert effects.perform(step, attempt(step), "charge", {}, Calls()) == {"charged": 1}


def test_the_same_effect_with_a_different_request_is_refused(world: World, step: Step) -> None:
    with tenant_context(world.acme):
        with pytest.raises(TimeoutError):
            effects.perform(
                step, attempt(step), "charge", {"amount": 5}, Calls(fail=TimeoutError())
            )
        calls = Calls()
        with pytest.raises(PermanentError, match="different request"):
            effects.perform(step, attempt(step), "charge", {"amount": 6}, calls)
        assert calls.keys == []


def test_a_worker_that_lost_its_lease_does_not_call_out(world: World, step: Step) -> None:
    with tenant_context(world.acme):
        stale = attempt(step)
        attempt(step)  # another worker holds the step now
        calls = Calls()
        with pytest.raises(LeaseLost):
            effects.perform(step, stale, "charge", {}, calls)
        assert calls.keys == [] and not Effect.objects.filter(step=step).exists()


def test_retry_delays_grow_exponentially_with_jitter() -> None:
    node = {"retry": {"backoff_s": 2}}
    for attempt_number, full in [(1, 2.0), (2, 4.0), (3, 8.0), (20, 300.0)]:
        delays = [retry_delay_s(node, attempt_number) for _ in range(200)]
        assert all(full / 2 <= d <= full for d in delays)
        assert len(set(delays)) > 100  # spread out, not one instant


def test_the_retry_budget_decides_between_retrying_and_dead_lettering(
    world: World, step: Step, settings: Any
) -> None:
    settings.SLUICE_RETRY_BUDGET_RATIO = 0.0
    settings.SLUICE_RETRY_BUDGET_MIN = 1
    run = step.run
    with tenant_context(world.acme):
        assert dead_or_retry(run, 1, 3, "boom", permanent=True) == "attempt 1/3: boom"
        assert dead_or_retry(run, 3, 3, "boom", permanent=False) == "attempt 3/3: boom"
        assert dead_or_retry(run, 1, 3, "boom", permanent=False) is None  # the one retry
        assert dead_or_retry(run, 2, 3, "boom", permanent=False) == (
            "attempt 2/3: boom; not retried: the run's retry budget is spent (0% of its steps + 1)"
        )
