"""Retries with backoff, then dead-lettering, on a worker whose engine fails the first two
attempts of every generation (the simulated engine's fault injection)."""

from collections.abc import Iterator

import pytest

from apps.runs.models import ResultRow, RunStatus, Step, StepStatus
from apps.runs.services import start_run
from apps.tenants.context import tenant_context
from tests.conftest import World
from tests.harness.platform import Platform
from tests.runs.helpers import wait_for_run
from workers.queues import CPU_WORKER_QUEUES

pytestmark = [pytest.mark.workers, pytest.mark.django_db(transaction=True)]


@pytest.fixture(scope="module")
def flaky_platform(django_db_setup: None) -> Iterator[Platform]:
    platform = Platform("retry")
    try:
        platform.start_worker("cpu", CPU_WORKER_QUEUES, pool="prefork", concurrency=2)
        platform.start_worker(
            "gpu", ["gpu"], concurrency=4, env={"SLUICE_SIM_FAIL_FIRST_ATTEMPTS": "2"}
        )
        platform.start_beat()
        yield platform
    finally:
        platform.stop()


def spec(max_attempts: int) -> dict[str, object]:
    return {
        "nodes": [
            {"id": "in", "type": "source.manual"},
            {
                "id": "gen",
                "type": "llm.generate",
                "retry": {"max_attempts": max_attempts, "backoff_s": 0.2},
                "config": {"prompt": "{{ q }}", "max_tokens": 4},
            },
            {"id": "store", "type": "sink.table", "config": {"table": "answers"}},
        ],
        "edges": [["in", "gen"], ["gen", "store"]],
    }


def test_transient_failures_are_retried_until_an_attempt_succeeds(
    world: World, flaky_platform: Platform
) -> None:
    graph = world.graph("patient", spec(max_attempts=3))
    with tenant_context(world.acme):
        run = start_run(version=graph.live_version(), payload={"q": "why"}, actor=world.owner)
    run = wait_for_run(run)
    with tenant_context(world.acme):
        assert run.status == RunStatus.SUCCEEDED, run.error
        gen = Step.objects.get(run=run, node_id="gen")
        assert (gen.status, gen.attempt) == (StepStatus.DONE, 3)
        assert (
            gen.error
            == "attempt 2/3: EngineUnavailable: simulated engine: injected 503 on attempt 2"
        )
        assert ResultRow.objects.filter(run=run).count() == 1


def test_a_step_out_of_attempts_is_dead_and_the_run_fails(
    world: World, flaky_platform: Platform
) -> None:
    graph = world.graph("impatient", spec(max_attempts=2))
    with tenant_context(world.acme):
        run = start_run(version=graph.live_version(), payload={"q": "why"}, actor=world.owner)
    run = wait_for_run(run)
    with tenant_context(world.acme):
        assert run.status == RunStatus.FAILED
        gen = Step.objects.get(run=run, node_id="gen")
        assert (gen.status, gen.attempt) == (StepStatus.DEAD, 2)
        assert gen.error.startswith("attempt 2/2: EngineUnavailable")
        assert run.error.startswith("1 failed step: gen: attempt 2/2")
        assert not Step.objects.filter(run=run, node_id="store").exists()
