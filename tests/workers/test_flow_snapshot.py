"""The providers page's read of flow-control state, against the real Redis the harness starts:
state is written by the scripts themselves (acquire and release), or by HSET where a test
needs a moment in the past. Every test uses its own model and provider names."""

import math
import time
import uuid
from decimal import Decimal

from sluice.redis_client import redis_client
from workers.flow.config import RETRY_WINDOW_S, FlowConfig
from workers.flow.snapshot import FlowFigures, ModelFlow, provider_states
from workers.flow.state import BUCKET_S, Outcome, Permit, acquire, release
from workers.inference.registry import ModelSpec


def spec(name: str, flow: FlowConfig | None, engine: str = "openai") -> ModelSpec:
    return ModelSpec(name, engine, {}, Decimal(0), Decimal(0), 2, ("other",), flow=flow)


def fresh(**settings: object) -> tuple[ModelSpec, FlowConfig]:
    name = f"m-{uuid.uuid4().hex[:8]}"
    config = FlowConfig(provider=f"p-{name}", **settings)  # type: ignore[arg-type]
    return spec(name, config), config


def take(model: ModelSpec, tokens: int = 10, *, retry: bool = False) -> Permit:
    assert model.flow is not None
    got = acquire(model.name, model.flow, uuid.uuid4().hex, tokens, retry=retry)
    assert isinstance(got, Permit), got
    return got


def one(model: ModelSpec, now: float | None = None) -> ModelFlow:
    [row] = provider_states({model.name: model}, now=now)
    return row


def figures_of(model: ModelSpec, now: float | None = None) -> FlowFigures:
    figures = one(model, now).figures
    assert figures is not None
    return figures


def test_an_unused_model_shows_its_configured_starting_point() -> None:
    model, config = fresh(rpm=120, tpm=5000, max_concurrency=7, retry_min=3)
    row = one(model)
    assert row.model == model.name and row.provider == config.provider
    assert row.engine == "openai" and row.fallbacks == ("other",)
    assert row.queue == f"gpu.{model.name}"
    figures = row.figures
    assert figures is not None
    assert figures.concurrency_limit == 7 and figures.in_flight == 0
    assert figures.rpm_available == 120 and figures.tpm_available == 5000
    assert figures.paused_for_s == 0 and figures.ttft_base_s is None
    assert figures.breaker.label == "closed" and figures.breaker.failures == 0
    budget = figures.retry_budget
    assert (budget.successes, budget.retries, budget.left) == (0, 0, 3)
    assert budget.window_s == RETRY_WINDOW_S


def test_permits_in_flight_count_unexpired_permits_only() -> None:
    model, config = fresh(max_concurrency=8)
    permits = [take(model) for _ in range(3)]
    release(config, permits[0], Outcome("neutral"))
    # A permit whose worker died: past its expiry, it no longer holds a place.
    redis_client().zadd(f"sluice:flow:model:{model.name}:permits", {"dead": time.time() - 1})
    figures = figures_of(model)
    assert figures.in_flight == 2


def test_a_throttled_release_halves_the_limit_and_retry_after_pauses() -> None:
    model, config = fresh(max_concurrency=8)
    permits = [take(model) for _ in range(2)]
    release(config, permits[0], Outcome("throttled", retry_after_s=20))
    figures = figures_of(model)
    assert figures.concurrency_limit == 4 and figures.in_flight == 1
    assert 19 < figures.paused_for_s <= 20
    release(config, permits[1], Outcome("ok", ttft_s=0.2))
    figures = figures_of(model)
    assert figures.ttft_base_s == 0.2
    assert figures.concurrency_limit == 4  # 4.25: the additive increase, shown whole


def test_buckets_show_what_is_left_and_refill_over_time() -> None:
    model, _ = fresh(rpm=60, tpm=1000)
    take(model, tokens=600)
    now = time.time()
    figures = figures_of(model, now)
    assert figures.rpm_available is not None
    assert 59 <= figures.rpm_available < 59.5
    assert figures.tpm_available is not None and 400 <= figures.tpm_available < 410
    later = figures_of(model, now + 30)  # half a minute's refill, capped at a minute's
    assert later.rpm_available == 60
    assert later.tpm_available is not None and 900 <= later.tpm_available < 910


def test_the_breaker_opens_after_consecutive_failures_then_allows_one_probe() -> None:
    model, config = fresh(breaker_failures=3, breaker_open_s=30)
    for _ in range(2):
        release(config, take(model), Outcome("failed"))
    figures = figures_of(model)
    assert figures.breaker.label == "closed" and figures.breaker.failures == 2
    release(config, take(model), Outcome("failed"))
    breaker = figures_of(model).breaker
    assert breaker.state == "open" and 29 < breaker.reopens_in_s <= 30
    # Past the open period: the next caller may probe.
    provider_key = f"sluice:flow:provider:{config.provider}"
    redis_client().hset(provider_key, "opened_at", time.time() - 31)
    assert figures_of(model).breaker.label == "half_open (probe allowed)"
    take(model)
    assert figures_of(model).breaker.label == "half_open (probe in flight)"


def test_the_retry_budget_counts_the_window_only() -> None:
    model, config = fresh(retry_ratio=0.5, retry_min=1)
    for _ in range(4):
        release(config, take(model), Outcome("ok"))
    take(model, retry=True)
    # Counts from before the window are not counted (a retry's acquire would prune them).
    stale = math.floor(time.time() / BUCKET_S) - math.ceil(RETRY_WINDOW_S / BUCKET_S) - 1
    redis_client().hset(
        f"sluice:flow:provider:{config.provider}:window",
        mapping={f"ok:{stale}": 50, f"retry:{stale}": 50},
    )
    budget = figures_of(model).retry_budget
    assert (budget.successes, budget.retries) == (4, 1)
    assert budget.left == 2  # retry_min 1 + ratio 0.5 * 4 successes - 1 retry
    take(model, retry=True)
    take(model, retry=True)
    assert figures_of(model).retry_budget.left == 0


def test_models_sharing_a_provider_share_its_breaker_and_budget() -> None:
    config = FlowConfig(provider=f"p-{uuid.uuid4().hex[:8]}", breaker_failures=1)
    a, b = spec(f"a-{config.provider}", config), spec(f"b-{config.provider}", config)
    release(config, take(a), Outcome("failed"))
    rows = provider_states({b.name: b, a.name: a})
    assert [row.model for row in rows] == [a.name, b.name]
    assert all(row.figures and row.figures.breaker.state == "open" for row in rows)


def test_models_without_flow_control_are_listed_after_the_rest() -> None:
    controlled, _ = fresh()
    plain = spec(f"plain-{uuid.uuid4().hex[:8]}", None, engine="simulated")
    rows = provider_states({plain.name: plain, controlled.name: controlled})
    assert [row.model for row in rows] == [controlled.name, plain.name]
    assert not rows[1].controlled and rows[1].figures is None and rows[1].provider is None


def test_reading_changes_nothing() -> None:
    model, config = fresh(rpm=10, breaker_failures=1, breaker_open_s=0.01)
    take(model)
    release(config, take(model), Outcome("failed"))  # open, and already past its period
    client = redis_client()
    client.zadd(f"sluice:flow:model:{model.name}:permits", {"dead": time.time() - 1})
    client.hset(f"sluice:flow:provider:{config.provider}:window", "ok:1", 3)
    keys = sorted(client.keys(f"sluice:flow:*{config.provider}*"))
    keys += sorted(client.keys(f"sluice:flow:model:{model.name}*"))

    def dump() -> list[object]:
        return [
            client.zrange(k, 0, -1, withscores=True)
            if client.type(k) == b"zset"
            else client.hgetall(k)
            for k in keys
        ]

    before = dump()
    time.sleep(0.05)
    row = one(model)
    assert row.figures is not None and row.figures.breaker.label == "half_open (probe allowed)"
    assert dump() == before
