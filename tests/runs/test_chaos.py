"""Chaos: 200 items through a 5-stage graph whose stage 3 calls a loopback service that
records idempotency keys; a random worker is SIGKILLed five times mid-run and replaced.
The run must succeed with every item's output once and every call performed once."""

from collections.abc import Iterator

import pytest

from apps.runs.models import RunStatus
from tests.conftest import World
from tests.harness.chaos import WorkerPool, chaos_spec, run_chaos
from tests.harness.effect_service import EffectService
from tests.harness.platform import Platform
from tests.runs.test_effects import allow_loopback
from workers.queues import CPU_WORKER_QUEUES

pytestmark = [pytest.mark.workers, pytest.mark.django_db(transaction=True)]

ITEMS = 200
KILLS = 5


@pytest.fixture
def chaos_platform(django_db_setup: None) -> Iterator[Platform]:
    platform = Platform("chaos")
    try:
        platform.start_beat()
        yield platform
    finally:
        platform.stop()


def test_killing_workers_loses_nothing_and_repeats_no_effect(
    world: World, chaos_platform: Platform
) -> None:
    allow_loopback(world)
    # A slow-ish API, so kills land mid-call as well as between calls and commits.
    with EffectService(delay_s=0.02) as service:
        graph = world.graph("chaos", chaos_spec(service.url, ITEMS))
        pool = WorkerPool(
            lambda name: chaos_platform.start_worker(
                name, CPU_WORKER_QUEUES, pool="prefork", concurrency=2
            ),
            ["chaos-a", "chaos-b"],
        )
        report = run_chaos(
            graph.live_version(), world.owner, service, pool, items=ITEMS, kills=KILLS
        )
    assert len(report.kills) == KILLS
    assert report.run_status == RunStatus.SUCCEEDED, report.run_error
    assert report.lost == 0 and report.duplicate_outputs == 0
    # Each call was performed once: a retry after an unknown outcome reused the key and the
    # service answered it from its record (counted apart, as replays). The ledger may count
    # more calls still: those a kill cut off before the request left the worker.
    assert report.effects_performed == ITEMS and report.duplicate_effects == 0
    assert report.ledger_calls >= ITEMS + report.replays_deduplicated
    assert service.without_key == 0
