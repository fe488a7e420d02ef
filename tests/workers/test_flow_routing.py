"""Which model serves a request: routing rules, fallbacks, the min_quality floor, waiting and
deferring, against the real Redis state. Models get fresh names per test."""

import uuid
from dataclasses import replace
from decimal import Decimal

import pytest

from workers.flow.config import FlowConfig
from workers.flow.routing import Routed, plan, route, shed_if_crowded
from workers.flow.state import Outcome, Permit, acquire, release
from workers.inference.registry import ModelSpec, Route
from workers.operators.base import Deferred, PermanentError


def spec(name: str, quality: int, *, flow: bool = True, **fields: object) -> ModelSpec:
    return ModelSpec(
        name=name,
        engine="openai",
        params={},
        usd_per_mtok_in=Decimal(1),
        usd_per_mtok_out=Decimal(1),
        quality=quality,
        flow=FlowConfig(provider=f"{name}-provider", breaker_failures=1, breaker_open_s=5)
        if flow
        else None,
        **fields,  # type: ignore[arg-type]
    )


def registry(cheap_quality: int = 1) -> dict[str, ModelSpec]:
    tag = uuid.uuid4().hex[:6]
    best, cheap, peer = f"best-{tag}", f"cheap-{tag}", f"peer-{tag}"
    return {
        "best": spec(best, 3, fallbacks=("peer", "cheap"), routes=(Route(5, "cheap"),)),
        "peer": spec(peer, 3),
        "cheap": spec(cheap, cheap_quality),
    }


def names(models: dict[str, ModelSpec], routed_plan_names: list[str]) -> list[str]:
    by_spec = {s.name: key for key, s in models.items()}
    return [by_spec[n] for n in routed_plan_names]


def go(models: dict[str, ModelSpec], floor: int | None, prompt_tokens: int) -> Routed:
    return route(
        plan(models, "best", floor, prompt_tokens),
        request_id=uuid.uuid4().hex,
        tokens=prompt_tokens + 10,
        retry=False,
        heartbeat=lambda: None,
    )


def break_(model: ModelSpec) -> None:
    assert model.flow is not None
    permit = acquire(model.name, model.flow, uuid.uuid4().hex, 1, retry=False)
    assert isinstance(permit, Permit)
    release(model.flow, permit, Outcome("failed"))


def test_a_short_prompt_goes_to_the_cheaper_model_of_its_rule() -> None:
    models = registry()
    short = plan(models, "best", None, 4)
    assert names(models, [c.spec.name for c in short.candidates]) == ["cheap", "best", "peer"]
    long = plan(models, "best", None, 50)
    assert names(models, [c.spec.name for c in long.candidates]) == ["best", "peer", "cheap"]
    routed = go(models, None, 4)
    assert routed.spec.name == models["cheap"].name
    assert "rule: prompts of at most 5 tokens" in routed.note


def test_min_quality_keeps_rules_and_fallbacks_below_the_floor_out() -> None:
    models = registry(cheap_quality=2)
    floored = plan(models, "best", 3, 4)
    assert names(models, [c.spec.name for c in floored.candidates]) == ["best", "peer"]
    assert any("rule not applied" in note for note in floored.notes)
    assert any("fallback" in n and "below min_quality 3" in n for n in floored.notes)
    assert go(models, 3, 4).spec.name == models["best"].name


def test_an_open_breaker_sends_the_request_to_the_next_fallback_with_the_reason() -> None:
    models = registry()
    break_(models["best"])
    routed = go(models, None, 50)
    assert routed.spec.name == models["peer"].name
    assert "circuit breaker is open" in routed.note and "(fallback)" in routed.note


def test_with_every_allowed_model_down_the_step_waits_instead_of_going_below_the_floor() -> None:
    models = registry()
    break_(models["best"])
    break_(models["peer"])
    with pytest.raises(Deferred) as deferred:
        go(models, 3, 50)
    assert 4 < deferred.value.wait_s <= 5
    assert "circuit breaker is open" in str(deferred.value)
    assert "below min_quality 3" in str(deferred.value)
    assert go(models, None, 50).spec.name == models["cheap"].name  # no floor: it may serve


def test_a_spent_retry_budget_everywhere_fails_fast_with_the_reason() -> None:
    name = f"solo-{uuid.uuid4().hex[:6]}"
    models = {"best": replace(spec(name, 2), flow=FlowConfig(provider=name, retry_min=0))}
    with pytest.raises(PermanentError, match="retry budget is spent"):
        route(
            plan(models, "best", None, 5),
            request_id="r",
            tokens=10,
            retry=True,
            heartbeat=lambda: None,
        )


def test_a_model_without_flow_control_is_served_at_once() -> None:
    models = {"best": spec("local", 2, flow=False)}
    routed = go(models, None, 5)
    assert routed.permit is None and routed.note == ""


def test_shedding_defers_only_while_higher_priority_work_waits() -> None:
    model = spec(f"shed-{uuid.uuid4().hex[:6]}", 2)
    assert model.flow is not None
    limit = model.flow.tenant_queue_limit
    shed_if_crowded(model, "low", lambda: (limit + 1, 0))  # nothing outranks it: it goes
    shed_if_crowded(model, "low", lambda: (limit, 3))  # at the limit: it goes
    with pytest.raises(Deferred, match="of higher priority than low go first"):
        shed_if_crowded(model, "low", lambda: (limit + 1, 3))
