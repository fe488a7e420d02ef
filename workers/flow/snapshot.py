"""What flow control holds in Redis right now, per model, for people to read (the providers
page): limits as configured and as adapted, permits in flight, tokens left in the buckets,
a Retry-After pause, the provider's breaker and retry budget.

Read-only: nothing is written, refilled or pruned. The figures are worked out here the way
the scripts in state.py would see them at the same instant (buckets refilled to now, expired
permits not counted, an open breaker past its open period shown as allowing a probe), so
reading them changes no decision. One pipelined round trip to Redis.
"""

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass

from sluice.redis_client import redis_client
from workers.flow.config import RETRY_WINDOW_S, FlowConfig
from workers.flow.state import BUCKET_S, keys
from workers.inference.registry import ModelSpec

_MODEL_FIELDS = ("limit", "paused_until", "rpm_t", "rpm_at", "tpm_t", "tpm_at", "ttft_base")
_PROVIDER_FIELDS = ("state", "failures", "opened_at", "probe", "probe_until")


@dataclass(frozen=True)
class Breaker:
    """A provider's circuit breaker as a model sees it (the open period is the model's)."""

    state: str  # closed | open | half_open
    failures: int  # consecutive failures while closed
    reopens_in_s: float  # open: seconds until one probe may go through; else 0
    probe_in_flight: bool  # half_open: the one probe is out and has not reported

    @property
    def label(self) -> str:
        if self.state != "half_open":
            return self.state
        return f"half_open (probe {'in flight' if self.probe_in_flight else 'allowed'})"


@dataclass(frozen=True)
class RetryBudget:
    """A provider's retries against its successes over the last `window_s` seconds."""

    successes: int
    retries: int
    left: int  # retries a model with this config may still send in the window
    window_s: int


@dataclass(frozen=True)
class FlowFigures:
    concurrency_limit: int  # the adaptive limit now (its maximum until first adapted)
    in_flight: int  # permits held and not expired
    rpm_available: float | None  # None: no RPM limit
    tpm_available: float | None  # None: no TPM limit
    paused_for_s: float  # a Retry-After pause still running; 0: none
    ttft_base_s: float | None  # the usual time to first token; None: not measured yet
    breaker: Breaker
    retry_budget: RetryBudget


@dataclass(frozen=True)
class ModelFlow:
    """One model of the registry and, when it is flow-controlled, its state now."""

    model: str
    engine: str
    quality: int
    fallbacks: tuple[str, ...]
    queue: str
    config: FlowConfig | None  # None: not flow-controlled
    figures: FlowFigures | None  # None exactly when config is

    @property
    def provider(self) -> str | None:
        return self.config.provider if self.config is not None else None

    @property
    def controlled(self) -> bool:
        return self.config is not None


def provider_states(
    models: Mapping[str, ModelSpec], *, now: float | None = None
) -> list[ModelFlow]:
    """Every model of `models`: the flow-controlled ones by provider then name, then the rest
    by name, marked not flow-controlled (config and figures None)."""
    now = time.time() if now is None else now
    controlled = sorted(
        (spec for spec in models.values() if spec.flow is not None),
        key=lambda spec: (spec.flow.provider if spec.flow else "", spec.name),
    )
    model_rows, provider_rows = _read(controlled, now)
    rows = []
    for spec in controlled:
        assert spec.flow is not None
        provider, window = provider_rows[spec.flow.provider]
        figures = _figures(spec.flow, model_rows[spec.name], provider, window, now)
        rows.append(_row(spec, figures))
    rows += [
        _row(spec, None)
        for spec in sorted(models.values(), key=lambda s: s.name)
        if spec.flow is None
    ]
    return rows


_Fields = dict[str, str]
_ModelRow = tuple[_Fields, int]  # the model hash, permits in flight
_ProviderRow = tuple[_Fields, dict[str, int]]  # the provider hash, the window's counts


def _read(
    specs: list[ModelSpec], now: float
) -> tuple[dict[str, _ModelRow], dict[str, _ProviderRow]]:
    """The models' and their providers' keys, in one round trip."""
    if not specs:
        return {}, {}
    pipe = redis_client().pipeline(transaction=False)
    providers: dict[str, tuple[str, str]] = {}  # provider → its hash and window keys
    for spec in specs:
        assert spec.flow is not None
        model_key, permits_key, provider_key, window_key = keys(spec.name, spec.flow)
        pipe.hmget(model_key, _MODEL_FIELDS)
        pipe.zcount(permits_key, f"({now!r}", "+inf")  # unexpired: scored above now
        providers.setdefault(spec.flow.provider, (provider_key, window_key))
    for provider_key, window_key in providers.values():
        pipe.hmget(provider_key, _PROVIDER_FIELDS)
        pipe.hgetall(window_key)
    replies = iter(pipe.execute())
    models = {spec.name: (_fields(_MODEL_FIELDS, next(replies)), next(replies)) for spec in specs}
    provider_rows = {
        provider: (
            _fields(_PROVIDER_FIELDS, next(replies)),
            {_text(k): int(v) for k, v in next(replies).items()},
        )
        for provider in providers
    }
    return models, provider_rows


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _fields(names: tuple[str, ...], values: list[bytes | None]) -> _Fields:
    return {name: _text(v) for name, v in zip(names, values, strict=True) if v is not None}


def _number(fields: _Fields, name: str) -> float | None:
    try:
        return float(fields[name])
    except (KeyError, ValueError):
        return None


def _row(spec: ModelSpec, figures: FlowFigures | None) -> ModelFlow:
    return ModelFlow(
        model=spec.name,
        engine=spec.engine,
        quality=spec.quality,
        fallbacks=spec.fallbacks,
        queue=spec.queue,
        config=spec.flow,
        figures=figures,
    )


def _figures(
    config: FlowConfig,
    model: _ModelRow,
    provider: _Fields,
    window: dict[str, int],
    now: float,
) -> FlowFigures:
    fields, in_flight = model
    limit = _number(fields, "limit")
    paused_until = _number(fields, "paused_until") or 0.0
    return FlowFigures(
        concurrency_limit=max(1, math.floor(config.max_concurrency if limit is None else limit)),
        in_flight=in_flight,
        rpm_available=_bucket(fields, "rpm", config.rpm, now),
        tpm_available=_bucket(fields, "tpm", config.tpm, now),
        paused_for_s=max(0.0, paused_until - now),
        ttft_base_s=_number(fields, "ttft_base"),
        breaker=_breaker(config, provider, now),
        retry_budget=_retry_budget(config, window, now),
    )


def _bucket(fields: _Fields, kind: str, per_minute: int | None, now: float) -> float | None:
    """Tokens in the bucket now: the saved level refilled at per_minute/60 a second since it
    was saved, up to a minute's worth (state.py's `refill`)."""
    if not per_minute:
        return None
    saved, at = _number(fields, f"{kind}_t"), _number(fields, f"{kind}_at")
    tokens = per_minute if saved is None else saved
    elapsed = max(0.0, now - (now if at is None else at))
    return min(float(per_minute), tokens + elapsed * per_minute / 60)


def _breaker(config: FlowConfig, fields: _Fields, now: float) -> Breaker:
    """As acquire sees it: an open breaker past its open period is half-open, and lets one
    probe through unless one is out and has not reported within state.PROBE_TTL_S."""
    state = fields.get("state") or "closed"
    failures = int(_number(fields, "failures") or 0)
    if state == "open":
        reopen = (_number(fields, "opened_at") or 0.0) + config.breaker_open_s
        if now < reopen:
            return Breaker("open", failures, reopen - now, probe_in_flight=False)
        state = "half_open"
    if state == "half_open":
        probing = bool(fields.get("probe")) and (_number(fields, "probe_until") or 0.0) > now
        return Breaker("half_open", failures, 0.0, probe_in_flight=probing)
    return Breaker(state, failures, 0.0, probe_in_flight=False)


def _retry_budget(config: FlowConfig, window: dict[str, int], now: float) -> RetryBudget:
    """Counts of the buckets still inside the window, as a retry's acquire would count them
    (older buckets are left for that acquire to prune)."""
    oldest = math.floor(now / BUCKET_S) - math.ceil(RETRY_WINDOW_S / BUCKET_S) + 1
    successes = retries = 0
    for name, count in window.items():
        kind, _, bucket = name.partition(":")
        if not bucket.isdigit() or int(bucket) < oldest:
            continue
        if kind == "ok":
            successes += count
        else:
            retries += count
    room = config.retry_min + config.retry_ratio * successes - retries
    return RetryBudget(successes, retries, max(0, math.ceil(room)), RETRY_WINDOW_S)
