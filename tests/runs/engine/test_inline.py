"""The fast path: a commit may hand its worker one new step on the worker's own queue,
already leased, so it runs next without a message; every other new step gets one."""

from collections.abc import Callable
from typing import Any

import pytest

from apps.runs.engine.execute import run_claimed
from apps.runs.engine.outbox import StepMessage
from apps.runs.models import RunStatus, Step, StepStatus
from apps.tenants.context import tenant_context
from tests.conftest import World
from tests.runs.engine.helpers import begin, claim, only_step

SPEC: dict[str, Any] = {
    "nodes": [
        {"id": "in", "type": "source.manual"},
        {"id": "split", "type": "fanout.split", "config": {"field": "items"}},
        {"id": "shape", "type": "transform.template", "config": {"template": "{{ item }}"}},
        {
            "id": "elsewhere",
            "type": "transform.template",
            "config": {"template": "{{ item }}"},
            "resources": {"queue": "gpu"},
        },
    ],
    "edges": [["in", "split"], ["split", "shape"], ["split", "elsewhere"]],
}


@pytest.mark.django_db
def test_a_commit_claims_one_step_on_its_own_queue_and_messages_the_rest(
    world: World,
    sent: list[StepMessage],
    django_capture_on_commit_callbacks: Callable[..., Any],
) -> None:
    run = begin(world, "inline", SPEC, {"items": ["a", "b"]})
    with tenant_context(world.acme):
        first = claim(only_step(run, "in"), "w1")
        with django_capture_on_commit_callbacks(execute=True):
            split = run_claimed(first, inline_queue="cpu")
        assert split is not None and split.step.node_id == "split"
        assert sent == []  # the only new step is the one handed over
        row = only_step(run, "split")
        assert (row.status, row.attempt, row.worker) == (StepStatus.RUNNING, 1, "w1")
        assert row.lease_token == split.token

        with django_capture_on_commit_callbacks(execute=True):
            nxt = run_claimed(split, inline_queue="cpu")
        assert nxt is not None and nxt.step.queue == "cpu"
        new = Step.objects.filter(run=run, node_id__in=["shape", "elsewhere"])
        assert new.count() == 4
        assert new.filter(status=StepStatus.RUNNING).get().id == nxt.step.id
        # One message for each of the three others, the gpu steps among them.
        assert sorted((m.queue, m.step_id != nxt.step.id) for m in sent) == [
            ("cpu", True),
            ("gpu", True),
            ("gpu", True),
        ]
        run.refresh_from_db()
        assert (run.status, run.open_steps) == (RunStatus.RUNNING, 4)

        assert run_claimed(nxt, inline_queue=None) is None
        assert Step.objects.get(id=nxt.step.id).status == StepStatus.DONE
