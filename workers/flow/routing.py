"""Which model serves a generation, and when: the request's candidates in order (a routing
rule's cheaper model, the model asked for, its fallbacks), never one below the node's
`min_quality`, each asked for a flow-control permit in turn.

A candidate that can take the request now serves it. One that could after a short wait
(within its `wait_limit_s`, counted over the whole routing) is waited for in the step, with
heartbeats, before anything further down the list is used. When none can, the step goes back
to the queue until the soonest of them frees up (`Deferred`), or, when no wait would help (a
retry budget spent everywhere), fails at once with every reason.
"""

import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from workers.flow import state
from workers.flow.state import Denial, Outcome, Permit
from workers.inference.base import EngineError, EngineRejected
from workers.inference.registry import ModelSpec
from workers.operators.base import Deferred, PermanentError

PRIORITIES = {"low": 0, "normal": 1, "high": 2}


def priority_name(number: int) -> str:
    """The name of a step's stored priority (the platform writes only these three)."""
    names = list(PRIORITIES)
    return names[min(max(number, 0), len(names) - 1)]


WAIT_SLICE_S = 0.25  # the longest sleep between heartbeats while waiting for a permit
MIN_DEFER_S = 0.2
SHED_WAIT_S = 2.0  # how long a shed step waits before it looks again
RETRY_SOON_S = (0.05, 0.3)  # the next attempt after a flow-controlled failure, jittered


@dataclass(frozen=True)
class Candidate:
    spec: ModelSpec
    why: str  # "asked for", "fallback", or the routing rule


@dataclass
class Plan:
    candidates: list[Candidate]
    notes: list[str] = field(default_factory=list)  # rules and fallbacks left out, and why


def plan(
    models: Mapping[str, ModelSpec], requested: str, min_quality: int | None, prompt_tokens: int
) -> Plan:
    primary = models[requested]
    floor = min_quality or 0
    result = Plan([])
    for rule in primary.routes:
        if prompt_tokens > rule.max_prompt_tokens:
            continue
        target = models[rule.to]
        if target.quality < floor:
            result.notes.append(
                f"rule not applied ({rule.describe()}): {target.name} is quality"
                f" {target.quality}, below min_quality {floor}"
            )
            continue
        result.candidates.append(Candidate(target, f"rule: {rule.describe()}"))
        break
    result.candidates.append(Candidate(primary, "asked for"))
    for name in primary.fallbacks:
        fallback = models[name]
        if fallback.quality < floor:
            result.notes.append(
                f"fallback {name} not used: quality {fallback.quality} is below min_quality {floor}"
            )
            continue
        result.candidates.append(Candidate(fallback, "fallback"))
    unique = {c.spec.name: c for c in reversed(result.candidates)}  # the first of each name
    result.candidates = [c for c in result.candidates if unique[c.spec.name] is c]
    return result


@dataclass(frozen=True)
class Routed:
    spec: ModelSpec
    permit: Permit | None  # None: the model is not flow-controlled
    note: str  # for the step's details; empty when the model asked for served it plainly


def shed_if_crowded(
    spec: ModelSpec, priority: str, waiting_ahead: Callable[[], tuple[int, int]]
) -> None:
    """Raises Deferred when this tenant's queue for the model is over its limit and work of
    a higher priority is waiting: that goes first, and this step waits its turn."""
    if spec.flow is None:
        return
    waiting, higher = waiting_ahead()
    limit = spec.flow.tenant_queue_limit
    if waiting > limit and higher > 0:
        raise Deferred(
            f"shed: {waiting} of this tenant's steps wait for {spec.name} (limit {limit});"
            f" {higher} of higher priority than {priority} go first",
            wait_s=SHED_WAIT_S * random.uniform(0.75, 1.25),
        )


def route(
    routing_plan: Plan,
    *,
    request_id: str,
    tokens: int,
    retry: bool,
    heartbeat: Callable[[], None],
) -> Routed:
    """A permit from the first candidate that can serve, waiting briefly where worth it."""
    waited = 0.0
    while True:
        denials: list[tuple[Candidate, Denial]] = []
        short_wait = None
        for candidate in routing_plan.candidates:
            flow = candidate.spec.flow
            if flow is None:
                return Routed(candidate.spec, None, _note(candidate, denials, routing_plan))
            got = state.acquire(candidate.spec.name, flow, request_id, tokens, retry=retry)
            if isinstance(got, Permit):
                return Routed(candidate.spec, got, _note(candidate, denials, routing_plan))
            denials.append((candidate, got))
            # A half-open breaker's probe decides for everyone; the others move on.
            worth_waiting = got.kind == "wait" and got.why != "probe"
            if worth_waiting and waited + got.wait_s <= flow.wait_limit_s:
                short_wait = got.wait_s
                break
        if short_wait is None:
            break
        pause = min(max(short_wait, 0.01), WAIT_SLICE_S)
        time.sleep(pause)
        heartbeat()
        waited += pause
    reasons = "; ".join([d.reason for _, d in denials] + routing_plan.notes)
    waits = [d.wait_s for _, d in denials if d.kind == "wait"]
    if waits:
        raise Deferred(f"waiting: {reasons}", wait_s=max(min(waits), MIN_DEFER_S))
    raise PermanentError(f"not sent: {reasons}")


def _note(served: Candidate, denials: list[tuple[Candidate, Denial]], routing_plan: Plan) -> str:
    if served.why == "asked for" and not denials:
        return ""
    parts = [f"served by {served.spec.name} ({served.why})"]
    parts += [f"{c.spec.name} passed over: {d.reason}" for c, d in denials]
    parts += routing_plan.notes
    return "; ".join(parts)


def outcome_of(error: EngineError | None, ttft_s: float | None, used_tokens: int) -> Outcome:
    """What a finished attempt tells flow control. A stop (cancel, deadline, budget) and a
    refused request say nothing about the provider's health."""
    if error is None:
        return Outcome("ok", ttft_s=ttft_s, used_tokens=used_tokens)
    if isinstance(error, EngineRejected):
        return Outcome("neutral", used_tokens=used_tokens)
    retry_after = getattr(error, "retry_after_s", None)
    kind = "throttled" if getattr(error, "throttled", False) else "failed"
    return Outcome(kind, used_tokens=used_tokens, retry_after_s=retry_after)


def retry_soon_s() -> float:
    return random.uniform(*RETRY_SOON_S)
