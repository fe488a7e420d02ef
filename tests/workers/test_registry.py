"""The model registry: entries parsed with errors naming the model and the field, costs in
Decimal, tenant overrides (prices, quality, fallbacks only) applied without touching the
platform's registry, a broken SLUICE_MODELS refused at startup, and API keys read from the
worker's environment without their value ever appearing in an error or a repr."""

from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings

from workers.inference.registry import (
    BUILTIN_MODELS,
    ModelSpec,
    RegistryError,
    build_engine,
    check_overrides,
    models_for,
    parse_entry,
    platform_models,
)


@pytest.fixture(autouse=True)
def fresh_registry() -> Iterator[None]:
    platform_models.cache_clear()
    yield
    platform_models.cache_clear()


def entry(**fields: Any) -> dict[str, Any]:
    return {"engine": "simulated", **fields}


# --- parse_entry -------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(BUILTIN_MODELS))
def test_the_builtin_entries_parse(name: str) -> None:
    spec = parse_entry(name, BUILTIN_MODELS[name])
    assert spec.name == name and spec.engine == "simulated" and spec.simulated
    assert spec.quality in (1, 2, 3)
    assert isinstance(spec.usd_per_mtok_in, Decimal)


def test_an_entry_gets_defaults_for_what_it_leaves_out() -> None:
    spec = parse_entry("bare", {"engine": "vllm"})
    assert spec == ModelSpec(
        name="bare",
        engine="vllm",
        params={},
        usd_per_mtok_in=Decimal(0),
        usd_per_mtok_out=Decimal(0),
        quality=2,
        fallbacks=(),
    )
    assert not spec.simulated


@pytest.mark.parametrize(
    ("name", "raw", "problem"),
    [
        ("Bad Name", entry(), "name must match"),
        ("-leading", entry(), "name must match"),
        ("x" * 64, entry(), "name must match"),
        ("m", ["simulated"], "entry must be an object"),
        ("m", {"engine": "tensorflow"}, "engine must be one of"),
        ("m", {}, "engine must be one of"),
        ("m", entry(speed=3), "unknown field(s) speed"),
        ("m", entry(params=["a"]), "params must be an object"),
        ("m", entry(usd_per_mtok_in=-1), "usd_per_mtok_in must be a number ≥ 0, got -1"),
        ("m", entry(usd_per_mtok_out="NaN"), "usd_per_mtok_out must be a number ≥ 0"),
        ("m", entry(usd_per_mtok_out="Infinity"), "usd_per_mtok_out must be a number ≥ 0"),
        ("m", entry(usd_per_mtok_in="cheap"), "usd_per_mtok_in must be a number, got 'cheap'"),
        ("m", entry(usd_per_mtok_in=None), "usd_per_mtok_in must be a number, got None"),
        ("m", entry(usd_per_mtok_in=[1]), "usd_per_mtok_in must be a number"),
        ("m", entry(quality=4), "quality must be one of (1, 2, 3)"),
        ("m", entry(quality="2"), "quality must be one of (1, 2, 3)"),
        ("m", entry(fallbacks="small"), "fallbacks must be a list of model names"),
        ("m", entry(fallbacks=["small", 3]), "fallbacks must be a list of model names"),
        ("m", entry(routes={"to": "small"}), "routes must be a list"),
        ("m", entry(routes=[{"to": "small"}]), "routes[0] must be an object with"),
        ("m", entry(routes=[{"max_prompt_tokens": 0, "to": "s"}]), "routes[0].max_prompt_tokens"),
        ("m", entry(routes=[{"max_prompt_tokens": 9, "to": 1}]), "routes[0].to must be a model"),
        ("m", entry(flow={"rpm": -5}), "flow.rpm must be a positive whole number"),
        ("m", entry(flow=[]), "flow must be an object"),
    ],
)
def test_an_invalid_entry_is_refused_naming_the_model_and_field(
    name: str, raw: Any, problem: str
) -> None:
    with pytest.raises(RegistryError) as caught:
        parse_entry(name, raw)
    message = str(caught.value)
    assert message.startswith(f"model {name!r}: ")
    assert problem in message


def test_cost_is_exact_decimal_arithmetic() -> None:
    spec = parse_entry("m", entry(usd_per_mtok_in="0.10", usd_per_mtok_out="0.40"))
    cost = spec.cost(3, 7)
    assert isinstance(cost, Decimal)
    assert cost == Decimal("0.0000031")  # (3 * 0.10 + 7 * 0.40) / 1e6, no float rounding
    assert spec.cost(1_000_000, 1_000_000) == Decimal("0.50")
    assert spec.cost(0, 0) == 0
    assert parse_entry("free", entry()).cost(10**9, 10**9) == 0


def test_a_models_queue_is_its_pool() -> None:
    assert parse_entry("llama-8b", entry()).queue == "gpu.llama-8b"
    assert {spec.queue for spec in platform_models().values()} >= {"gpu.default", "gpu.small"}


# --- the platform registry ---------------------------------------------------------------


def test_settings_entries_merge_over_the_builtins() -> None:
    extra = {"big": entry(quality=3, usd_per_mtok_out="9", fallbacks=["default"])}
    with override_settings(SLUICE_MODELS=extra):
        platform_models.cache_clear()
        models = platform_models()
    assert set(models) == {"default", "small", "big"}
    assert models["big"].fallbacks == ("default",) and models["big"].usd_per_mtok_out == 9


@pytest.mark.parametrize(
    ("models", "problem"),
    [
        ({"big": {"engine": "tpu"}}, "model 'big': engine must be one of"),
        ({"big": entry(fallbacks=["nope"])}, "model 'big': unknown fallback 'nope'"),
        ({"big": entry(fallbacks=["big"])}, "model 'big': a model cannot fall back to itself"),
        ({"small": entry(fallbacks=["small"])}, "model 'small': a model cannot fall back"),
        ({"Big": entry()}, "model 'Big': name must match"),
    ],
)
def test_a_broken_sluice_models_is_refused_naming_the_setting(
    models: dict[str, Any], problem: str
) -> None:
    with override_settings(SLUICE_MODELS=models):
        platform_models.cache_clear()
        with pytest.raises(ImproperlyConfigured) as caught:
            platform_models()
    message = str(caught.value)
    assert message.startswith("SLUICE_MODELS: ") and problem in message


# --- tenant overrides --------------------------------------------------------------------


def test_tenant_overrides_apply_to_that_tenant_only() -> None:
    platform = dict(platform_models())
    overrides = {
        "default": {"usd_per_mtok_in": "0.25", "usd_per_mtok_out": 1, "quality": 3},
        "small": {"fallbacks": ["default"]},
    }
    assert check_overrides(overrides) is overrides
    tenant = models_for(overrides)
    assert tenant["default"].usd_per_mtok_in == Decimal("0.25")
    assert tenant["default"].usd_per_mtok_out == Decimal(1)
    assert tenant["default"].quality == 3
    assert tenant["default"].fallbacks == platform["default"].fallbacks  # not overridden
    assert tenant["small"].fallbacks == ("default",)
    # What a tenant cannot change stays the platform's.
    assert tenant["default"].engine == platform["default"].engine
    assert tenant["small"].params == platform["small"].params
    assert tenant["default"].cost(0, 1_000_000) == Decimal(1)
    # The platform's registry (and so every other tenant's) is unchanged.
    assert platform_models() == platform
    assert platform_models()["default"].usd_per_mtok_in == Decimal("0.50")
    assert models_for({}) == platform


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        (["default"], "model overrides must be an object"),
        ({"gpt-9": {"quality": 1}}, "model 'gpt-9' is not in the registry"),
        ({"default": "cheap"}, "model 'default': override must be an object"),
        ({"default": {"engine": "openai"}}, "may override only"),
        ({"default": {"params": {"base_url": "http://evil"}}}, "not params"),
        ({"default": {"engine": "openai", "quality": 1}}, "not engine"),
        ({"default": {"usd_per_mtok_in": "-0.01"}}, "usd_per_mtok_in must be a number ≥ 0"),
        ({"default": {"usd_per_mtok_out": "NaN"}}, "usd_per_mtok_out must be a number ≥ 0"),
        ({"default": {"usd_per_mtok_out": "free"}}, "usd_per_mtok_out must be a number"),
        ({"default": {"quality": 0}}, "quality must be one of"),
        ({"default": {"fallbacks": "small"}}, "fallbacks must be a list"),
        ({"default": {"fallbacks": ["nope"]}}, "model 'default': unknown fallback 'nope'"),
        ({"small": {"fallbacks": ["small"]}}, "model 'small': a model cannot fall back"),
        ({"default": {"flow": {"rpm": 1}}}, "not flow"),
        (
            {"default": {"routes": [{"max_prompt_tokens": 9, "to": "gpt-9"}]}},
            "model 'default': routes to unknown model 'gpt-9'",
        ),
    ],
)
def test_check_overrides_refuses_what_a_tenant_may_not_set(overrides: Any, problem: str) -> None:
    before = dict(platform_models())
    with pytest.raises(RegistryError) as caught:
        check_overrides(overrides)
    assert problem in str(caught.value)
    assert platform_models() == before


def test_a_tenant_may_set_its_own_routing_rules() -> None:
    rules = [{"max_prompt_tokens": 32, "to": "small"}]
    assert check_overrides({"default": {"routes": rules}})
    routes = models_for({"default": {"routes": rules}})["default"].routes
    assert [(r.max_prompt_tokens, r.to) for r in routes] == [(32, "small")]
    assert platform_models()["default"].routes == ()


def test_remote_entries_are_flow_controlled_and_simulated_ones_are_not() -> None:
    remote_entry = {"engine": "openai", "params": {"base_url": "http://127.0.0.1:9/v1"}}
    flow = parse_entry("r", remote_entry).flow
    assert flow is not None and flow.provider == "r"
    assert parse_entry("s", entry()).flow is None
    shared = parse_entry("s", entry(flow={"provider": "gpu-pool", "max_concurrency": 4}))
    assert shared.flow is not None and shared.flow.max_concurrency == 4


# --- building engines --------------------------------------------------------------------


def remote(variable: str) -> ModelSpec:
    params = {"base_url": "http://127.0.0.1:9/v1", "model": "m", "api_key_env": variable}
    return parse_entry("remote", {"engine": "openai", "params": params})


def test_an_unset_api_key_variable_is_refused_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLUICE_TEST_REMOTE_KEY", raising=False)
    with pytest.raises(ImproperlyConfigured) as caught:
        build_engine(remote("SLUICE_TEST_REMOTE_KEY"))
    message = str(caught.value)
    assert "'remote'" in message and "SLUICE_TEST_REMOTE_KEY is not set" in message

    monkeypatch.setenv("SLUICE_TEST_REMOTE_KEY", "")  # empty counts as unset
    with pytest.raises(ImproperlyConfigured, match="SLUICE_TEST_REMOTE_KEY"):
        build_engine(remote("SLUICE_TEST_REMOTE_KEY"))


def test_a_set_api_key_is_used_but_never_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "sk-test-do-not-show-4242"
    monkeypatch.setenv("SLUICE_TEST_REMOTE_KEY", secret)
    spec = remote("SLUICE_TEST_REMOTE_KEY")
    engine = build_engine(spec)
    assert engine.name == "openai"
    assert secret not in repr(engine) and secret not in repr(spec)
    assert spec.params["api_key_env"] == "SLUICE_TEST_REMOTE_KEY"  # build_engine copied params


def test_a_simulated_entry_builds_a_simulated_engine_with_its_params() -> None:
    from workers.inference.simulated import SimulatedEngine

    spec = parse_entry("sim", entry(params={"tokens_per_s": 300, "batch_capacity": 5}))
    engine = build_engine(spec)
    assert isinstance(engine, SimulatedEngine)
    assert engine.tokens_per_s == 300 and engine.batch_capacity == 5


@pytest.mark.parametrize("quality", [True, 2.0])
def test_quality_must_be_an_integer_tier(quality: Any) -> None:
    with pytest.raises(RegistryError, match="quality"):
        parse_entry("m", entry(quality=quality))
