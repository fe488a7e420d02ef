"""A model's flow-control settings, from its registry entry's `flow` object.

Remote providers (the `openai` engine) are flow-controlled by default: their limits are not
ours and they fail in ways a retry can make worse. In-process engines (simulated, vLLM,
transformers) schedule their own batches, so they are flow-controlled only when their entry
asks for it. `"flow": {"enabled": false}` turns it off, which is what a per-call
backoff-only client looks like (bench/storm uses it as the baseline).
"""

from dataclasses import dataclass, fields
from typing import Any

_INTS = (
    "rpm",
    "tpm",
    "max_concurrency",
    "min_concurrency",
    "breaker_failures",
    "retry_min",
    "tenant_queue_limit",
)
_FLOATS = ("wait_limit_s", "breaker_open_s", "retry_ratio", "latency_factor")


@dataclass(frozen=True)
class FlowConfig:
    # Breaker and retry budget are kept per provider; several models may share one.
    provider: str
    # Token buckets; None: no limit of that kind. A minute's worth is the burst.
    rpm: int | None = None
    tpm: int | None = None
    # The adaptive concurrency limit moves between these (AIMD); it starts at the maximum.
    max_concurrency: int = 32
    min_concurrency: int = 1
    # A throttle wait up to this long is waited out in the step; past it the step falls
    # back to another model or, with none, goes back to the queue until the model frees up.
    wait_limit_s: float = 2.0
    # Consecutive failures (5xx, timeouts, dropped streams) that open the breaker, and how
    # long it stays open before one probe may go through.
    breaker_failures: int = 5
    breaker_open_s: float = 10.0
    # Retries sent to the provider in the last RETRY_WINDOW_S: at most this fraction of its
    # successes there, plus retry_min.
    retry_ratio: float = 0.2
    retry_min: int = 5
    # One tenant's waiting steps for the model past this: the highest priority goes first.
    tenant_queue_limit: int = 500
    # Time to first token above this multiple of the model's usual counts as congestion.
    latency_factor: float = 3.0


RETRY_WINDOW_S = 30


class FlowConfigError(ValueError):
    pass


def parse_flow(model: str, engine: str, raw: Any) -> FlowConfig | None:
    """The model's FlowConfig, or None when it is not flow-controlled; raises FlowConfigError
    naming the field."""
    if raw is None:
        return FlowConfig(provider=model) if engine == "openai" else None
    if not isinstance(raw, dict):
        raise FlowConfigError("flow must be an object")
    known = {f.name for f in fields(FlowConfig)} | {"enabled"}
    unknown = set(raw) - known
    if unknown:
        raise FlowConfigError(f"flow: unknown field(s) {', '.join(sorted(unknown))}")
    enabled = raw.get("enabled", True)
    if not isinstance(enabled, bool):
        raise FlowConfigError("flow.enabled must be true or false")
    if not enabled:
        return None
    provider = raw.get("provider", model)
    if not isinstance(provider, str) or not provider.strip() or len(provider) > 100:
        raise FlowConfigError("flow.provider must be a name of 1 to 100 characters")
    values: dict[str, Any] = {"provider": provider}
    for name in _INTS:
        if name in raw:
            value = raw[name]
            if type(value) is not int or value < (0 if name == "retry_min" else 1):
                raise FlowConfigError(f"flow.{name} must be a positive whole number")
            values[name] = value
    for name in _FLOATS:
        if name in raw:
            value = raw[name]
            if type(value) not in (int, float) or value < 0:
                raise FlowConfigError(f"flow.{name} must be a number ≥ 0")
            values[name] = float(value)
    config = FlowConfig(**values)
    if config.min_concurrency > config.max_concurrency:
        raise FlowConfigError("flow.min_concurrency must not exceed flow.max_concurrency")
    if config.latency_factor < 1:
        raise FlowConfigError("flow.latency_factor must be at least 1")
    return config
