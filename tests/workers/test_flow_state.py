"""Flow-control state against the real Redis the harness starts: each decision is one script,
so these exercise the scripts themselves. Every test uses its own model and provider names."""

import time
import uuid

import pytest

from sluice.redis_client import redis_client
from workers.flow.config import RETRY_WINDOW_S, FlowConfig, FlowConfigError, parse_flow
from workers.flow.state import Denial, Outcome, Permit, acquire, keys, release


def fresh(**settings: object) -> tuple[str, FlowConfig]:
    name = f"m-{uuid.uuid4().hex[:8]}"
    return name, FlowConfig(provider=f"p-{name}", **settings)  # type: ignore[arg-type]


def take(model: str, config: FlowConfig, tokens: int = 10, *, retry: bool = False) -> Permit:
    got = acquire(model, config, uuid.uuid4().hex, tokens, retry=retry)
    assert isinstance(got, Permit), got
    return got


def refused(model: str, config: FlowConfig, tokens: int = 10, *, retry: bool = False) -> Denial:
    got = acquire(model, config, uuid.uuid4().hex, tokens, retry=retry)
    assert isinstance(got, Denial), got
    return got


def test_concurrency_limit_and_aimd_decrease_on_429() -> None:
    model, config = fresh(max_concurrency=4, min_concurrency=1)
    permits = [take(model, config) for _ in range(4)]
    assert refused(model, config).reason == f"{model} is at its concurrency limit of 4"
    release(config, permits[0], Outcome("throttled"))  # the limit halves: 2, with 3 held
    release(config, permits[1], Outcome("ok", ttft_s=0.1))
    denial = refused(model, config)  # 2 held, limit 2 (+ 1/2 after the success)
    assert denial.kind == "wait" and "concurrency limit of 2" in denial.reason
    release(config, permits[2], Outcome("neutral"))
    take(model, config)


def test_retry_after_pauses_every_caller_of_the_model() -> None:
    model, config = fresh()
    release(config, take(model, config), Outcome("throttled", retry_after_s=0.5))
    denial = refused(model, config)
    assert denial.kind == "wait" and 0.3 < denial.wait_s <= 0.5
    assert "asked to retry after" in denial.reason
    time.sleep(0.55)
    take(model, config)


def test_breaker_opens_probes_once_and_closes_on_success() -> None:
    model, config = fresh(breaker_failures=3, breaker_open_s=0.4)
    for _ in range(2):
        release(config, take(model, config), Outcome("failed"))
    release(config, take(model, config), Outcome("ok", ttft_s=0.1))  # not consecutive: reset
    for _ in range(3):
        release(config, take(model, config), Outcome("failed"))
    denial = refused(model, config)
    assert "circuit breaker is open" in denial.reason and 0.2 < denial.wait_s <= 0.4
    time.sleep(0.45)
    probe = take(model, config)  # half-open: exactly one probe
    assert "half-open" in refused(model, config).reason
    release(config, probe, Outcome("failed"))  # the probe failed: open again
    assert "circuit breaker is open" in refused(model, config).reason
    time.sleep(0.45)
    release(config, take(model, config), Outcome("ok", ttft_s=0.1))
    take(model, config)
    take(model, config)  # closed: no longer one at a time


def test_a_throttled_probe_closes_the_breaker_but_the_pause_holds() -> None:
    model, config = fresh(breaker_failures=1, breaker_open_s=0.2)
    release(config, take(model, config), Outcome("failed"))
    time.sleep(0.25)
    release(config, take(model, config), Outcome("throttled", retry_after_s=0.3))
    assert "Retry-After" in refused(model, config).reason
    time.sleep(0.35)
    take(model, config)
    take(model, config)


def test_rpm_bucket_allows_a_minutes_burst_then_waits() -> None:
    model, config = fresh(rpm=3)
    for _ in range(3):
        release(config, take(model, config), Outcome("ok"))
    denial = refused(model, config)
    assert "RPM limit of 3" in denial.reason and 15 < denial.wait_s <= 20


def test_tpm_reserves_max_tokens_and_returns_what_was_not_used() -> None:
    model, config = fresh(tpm=1000)
    first = take(model, config, tokens=600)
    denial = refused(model, config, tokens=600)  # 400 left
    assert "TPM limit of 1000" in denial.reason
    release(config, first, Outcome("ok", used_tokens=100))  # 500 returned: 900 left
    take(model, config, tokens=600)
    assert refused(model, config, tokens=2000).kind == "too_big"


def test_retries_are_limited_to_a_fraction_of_recent_successes() -> None:
    model, config = fresh(retry_ratio=0.5, retry_min=1)
    release(config, take(model, config, retry=True), Outcome("failed"))  # the 1 free retry
    denial = refused(model, config, retry=True)
    assert denial.kind == "budget"
    assert "1 retries against 0 successes" in denial.reason
    take(model, config)  # first attempts are never held by the retry budget
    for _ in range(2):
        release(config, take(model, config), Outcome("ok"))
    take(model, config, retry=True)  # 2 successes at 0.5 each: one more retry
    assert refused(model, config, retry=True).kind == "budget"
    window = keys(model, config)[3]
    assert 0 < redis_client().ttl(window) <= 2 * RETRY_WINDOW_S  # counts do not pile up


def test_a_provider_shared_by_two_models_shares_its_breaker() -> None:
    config = FlowConfig(provider=f"p-{uuid.uuid4().hex[:8]}", breaker_failures=1)
    release(config, take("shared-a", config), Outcome("failed"))
    assert "circuit breaker is open" in refused("shared-b", config).reason


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        ("fast", "flow must be an object"),
        ({"rpm": 0}, "flow.rpm must be a positive whole number"),
        ({"wait_limit_s": -1}, "flow.wait_limit_s must be a number ≥ 0"),
        ({"burst": 3}, "unknown field(s) burst"),
        ({"min_concurrency": 9, "max_concurrency": 2}, "min_concurrency must not exceed"),
        ({"enabled": "no"}, "flow.enabled must be true or false"),
    ],
)
def test_bad_flow_settings_name_the_field(raw: object, problem: str) -> None:
    with pytest.raises(FlowConfigError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        parse_flow("m", "openai", raw)


def test_remote_models_are_flow_controlled_by_default_and_local_ones_are_not() -> None:
    assert parse_flow("m", "openai", None) == FlowConfig(provider="m")
    assert parse_flow("m", "simulated", None) is None
    assert parse_flow("m", "openai", {"enabled": False}) is None
    assert parse_flow("m", "vllm", {"provider": "gpu-a"}) == FlowConfig(provider="gpu-a")
