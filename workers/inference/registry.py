"""The model registry: which engine serves a model name, with what parameters, at what price,
at what quality tier, what to fall back to, which requests a cheaper model may take (`routes`),
and how calls to its provider are flow-controlled (`flow`, workers/flow/config.py).

The platform's registry comes from settings (`SLUICE_MODELS`, a JSON object of entries
merged over the built-in simulated models). A tenant may override, per model, its prices
(negotiated rates), quality tier and fallbacks, never its engine or parameters: where a
model's requests go is the platform's decision, so no tenant can point a GPU worker at an
address of its choosing.
"""

import os
import re
from dataclasses import dataclass, replace
from decimal import Decimal
from functools import cache
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from workers.flow.config import FlowConfig, FlowConfigError, parse_flow
from workers.inference.base import Engine

ENGINES = ("simulated", "openai", "vllm", "transformers")
MODEL_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
QUALITY_TIERS = (1, 2, 3)  # 1 basic, 2 standard, 3 best
ENTRY_FIELDS = {
    "engine",
    "params",
    "usd_per_mtok_in",
    "usd_per_mtok_out",
    "quality",
    "fallbacks",
    "routes",
    "flow",
}
# Routes only choose among registered models, so a tenant may set its own cost rules.
TENANT_OVERRIDABLE = ("usd_per_mtok_in", "usd_per_mtok_out", "quality", "fallbacks", "routes")


@dataclass(frozen=True)
class Route:
    """A request class another model may serve: prompts of at most `max_prompt_tokens`
    (estimated) go to `to`, unless that would undercut the node's min_quality."""

    max_prompt_tokens: int
    to: str

    def describe(self) -> str:
        return f"prompts of at most {self.max_prompt_tokens} tokens go to {self.to}"


MILLION = Decimal(1_000_000)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    engine: str
    params: dict[str, Any]
    usd_per_mtok_in: Decimal  # price per million prompt tokens
    usd_per_mtok_out: Decimal  # price per million completion tokens
    quality: int
    fallbacks: tuple[str, ...] = ()
    routes: tuple[Route, ...] = ()
    flow: FlowConfig | None = None

    @property
    def queue(self) -> str:
        """The Celery queue of this model's worker pool."""
        return f"gpu.{self.name}"

    @property
    def simulated(self) -> bool:
        return self.engine == "simulated"

    def cost(self, prompt_tokens: int, completion_tokens: int) -> Decimal:
        return (
            prompt_tokens * self.usd_per_mtok_in + completion_tokens * self.usd_per_mtok_out
        ) / MILLION


# Served by the simulated engine until an operator configures real ones; prices are
# illustrative so that cost and budgets work in the demo.
BUILTIN_MODELS: dict[str, dict[str, Any]] = {
    "default": {
        "engine": "simulated",
        "usd_per_mtok_in": "0.50",
        "usd_per_mtok_out": "1.50",
        "quality": 2,
        "fallbacks": ["small"],
    },
    "small": {
        "engine": "simulated",
        "params": {"tokens_per_s_factor": 2.0},
        "usd_per_mtok_in": "0.10",
        "usd_per_mtok_out": "0.40",
        "quality": 1,
    },
}


class RegistryError(ValueError):
    """A registry entry or a tenant override is invalid; the message names it."""


def parse_entry(name: str, raw: Any) -> ModelSpec:
    where = f"model {name!r}"
    if not MODEL_NAME.match(name):
        raise RegistryError(f"{where}: name must match {MODEL_NAME.pattern}")
    if not isinstance(raw, dict):
        raise RegistryError(f"{where}: entry must be an object")
    unknown = set(raw) - ENTRY_FIELDS
    if unknown:
        raise RegistryError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    engine = raw.get("engine")
    if engine not in ENGINES:
        raise RegistryError(f"{where}: engine must be one of {', '.join(ENGINES)}")
    params = raw.get("params", {})
    if not isinstance(params, dict):
        raise RegistryError(f"{where}: params must be an object")
    quality = raw.get("quality", 2)
    if type(quality) is not int or quality not in QUALITY_TIERS:
        raise RegistryError(f"{where}: quality must be one of {QUALITY_TIERS}")
    fallbacks = raw.get("fallbacks", [])
    if not isinstance(fallbacks, list) or not all(isinstance(f, str) for f in fallbacks):
        raise RegistryError(f"{where}: fallbacks must be a list of model names")
    try:
        flow = parse_flow(name, engine, raw.get("flow"))
    except FlowConfigError as exc:
        raise RegistryError(f"{where}: {exc}") from None
    return ModelSpec(
        name=name,
        engine=engine,
        params=params,
        usd_per_mtok_in=_price(where, "usd_per_mtok_in", raw.get("usd_per_mtok_in", "0")),
        usd_per_mtok_out=_price(where, "usd_per_mtok_out", raw.get("usd_per_mtok_out", "0")),
        quality=quality,
        fallbacks=tuple(fallbacks),
        routes=_routes(where, raw.get("routes", [])),
        flow=flow,
    )


def _routes(where: str, raw: Any) -> tuple[Route, ...]:
    if not isinstance(raw, list):
        raise RegistryError(f"{where}: routes must be a list")
    routes = []
    for i, rule in enumerate(raw):
        if not isinstance(rule, dict) or set(rule) != {"max_prompt_tokens", "to"}:
            raise RegistryError(
                f"{where}: routes[{i}] must be an object with max_prompt_tokens and to"
            )
        limit, target = rule["max_prompt_tokens"], rule["to"]
        if type(limit) is not int or limit < 1:
            raise RegistryError(f"{where}: routes[{i}].max_prompt_tokens must be a number ≥ 1")
        if not isinstance(target, str):
            raise RegistryError(f"{where}: routes[{i}].to must be a model name")
        routes.append(Route(limit, target))
    return tuple(routes)


def _price(where: str, field: str, value: Any) -> Decimal:
    try:
        price = Decimal(str(value))
    except ArithmeticError:
        raise RegistryError(f"{where}: {field} must be a number, got {value!r}") from None
    if not price.is_finite() or price < 0:
        raise RegistryError(f"{where}: {field} must be a number ≥ 0, got {value!r}")
    return price


def _check_fallbacks(models: dict[str, ModelSpec]) -> None:
    for spec in models.values():
        for fallback in spec.fallbacks:
            if fallback not in models:
                raise RegistryError(f"model {spec.name!r}: unknown fallback {fallback!r}")
            if fallback == spec.name:
                raise RegistryError(f"model {spec.name!r}: a model cannot fall back to itself")
        for route in spec.routes:
            if route.to not in models or route.to == spec.name:
                raise RegistryError(f"model {spec.name!r}: routes to unknown model {route.to!r}")


@cache
def platform_models() -> dict[str, ModelSpec]:
    entries = {**BUILTIN_MODELS, **settings.SLUICE_MODELS}
    try:
        models = {name: parse_entry(name, raw) for name, raw in entries.items()}
        _check_fallbacks(models)
    except RegistryError as exc:
        raise ImproperlyConfigured(f"SLUICE_MODELS: {exc}") from None
    return models


def models_for(overrides: dict[str, Any]) -> dict[str, ModelSpec]:
    """The registry as one tenant sees it: its overrides applied over the platform's."""
    if not overrides:
        return platform_models()
    models = dict(platform_models())
    for name, fields in overrides.items():
        base = models[name]
        changes: dict[str, Any] = {}
        for field in ("usd_per_mtok_in", "usd_per_mtok_out"):
            if field in fields:
                changes[field] = Decimal(str(fields[field]))
        if "quality" in fields:
            changes["quality"] = fields["quality"]
        if "fallbacks" in fields:
            changes["fallbacks"] = tuple(fields["fallbacks"])
        if "routes" in fields:
            changes["routes"] = _routes(f"model {name!r}", fields["routes"])
        models[name] = replace(base, **changes)
    return models


def check_overrides(overrides: Any) -> dict[str, Any]:
    """`overrides` when valid for a tenant; raises RegistryError naming the problem."""
    if not isinstance(overrides, dict):
        raise RegistryError("model overrides must be an object of model name → fields")
    platform = platform_models()
    for name, fields in overrides.items():
        if name not in platform:
            raise RegistryError(f"model {name!r} is not in the registry")
        if not isinstance(fields, dict):
            raise RegistryError(f"model {name!r}: override must be an object")
        refused = set(fields) - set(TENANT_OVERRIDABLE)
        if refused:
            raise RegistryError(
                f"model {name!r}: a tenant may override only {', '.join(TENANT_OVERRIDABLE)};"
                f" not {', '.join(sorted(refused))}"
            )
        merged = {**_as_raw(platform[name]), **fields}
        parse_entry(name, merged)
    _check_fallbacks(models_for(overrides))
    return overrides


def _as_raw(spec: ModelSpec) -> dict[str, Any]:
    return {
        "engine": spec.engine,
        "params": spec.params,
        "usd_per_mtok_in": str(spec.usd_per_mtok_in),
        "usd_per_mtok_out": str(spec.usd_per_mtok_out),
        "quality": spec.quality,
        "fallbacks": list(spec.fallbacks),
        "routes": [{"max_prompt_tokens": r.max_prompt_tokens, "to": r.to} for r in spec.routes],
    }


def inference_queues() -> list[str]:
    """Every model pool's queue; a single-machine GPU worker consumes them all."""
    return [spec.queue for spec in platform_models().values()]


def build_engine(spec: ModelSpec) -> Engine:
    """A new engine instance for `spec`. Heavy engines import their libraries only here."""
    params = dict(spec.params)
    if spec.engine == "simulated":
        from workers.inference.simulated import SimulatedEngine

        return SimulatedEngine.from_settings(**params)
    if spec.engine == "openai":
        from workers.inference.openai import OpenAIEngine

        api_key_env = params.pop("api_key_env", None)
        api_key = _env_secret(spec.name, api_key_env) if api_key_env else None
        return OpenAIEngine(api_key=api_key, **params)
    if spec.engine == "vllm":
        from workers.inference.vllm import VLLMEngine

        return VLLMEngine(**params)
    from workers.inference.transformers_engine import TransformersEngine

    return TransformersEngine(**params)


def _env_secret(model: str, variable: str) -> str:
    value = os.environ.get(variable)
    if not value:
        raise ImproperlyConfigured(
            f"model {model!r}: its API key variable {variable} is not set on this worker"
        )
    return value
