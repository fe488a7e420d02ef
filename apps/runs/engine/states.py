"""The engine's vocabulary and its decisions that need no database: which status changes are
legal, the one retry-or-dead decision, when a retry comes, and what each way of stopping a
run is called (as a run's status, a step's skip reason, a stop signal and an audit action).
"""

import random
from typing import Any

from django.conf import settings

from apps.graphs.validation import node_backoff_s
from apps.runs.models import RunStatus, StepStatus

RUN_TRANSITIONS: dict[str, set[str]] = {
    RunStatus.QUEUED: {
        RunStatus.RUNNING,
        RunStatus.SUCCEEDED,
        RunStatus.FAILED,
        RunStatus.CANCELLED,
        RunStatus.BUDGET_EXCEEDED,
    },
    RunStatus.RUNNING: {
        RunStatus.SUCCEEDED,
        RunStatus.FAILED,
        RunStatus.CANCELLED,
        RunStatus.BUDGET_EXCEEDED,
    },
    # failed -> running: its dead steps are replayed after a fix (replay.replay_dead_steps).
    RunStatus.FAILED: {RunStatus.RUNNING},
}

STEP_TRANSITIONS: dict[str, set[str]] = {
    StepStatus.QUEUED: {StepStatus.RUNNING, StepStatus.SKIPPED},
    StepStatus.FAILED: {StepStatus.RUNNING, StepStatus.SKIPPED},
    # running -> queued: the lease expired and the sweeper hands the step to another worker,
    # or flow control sends it back to wait; a chain's later steps go back when it breaks.
    StepStatus.RUNNING: {
        StepStatus.DONE,
        StepStatus.FAILED,
        StepStatus.DEAD,
        StepStatus.SKIPPED,
        StepStatus.QUEUED,
    },
    # dead -> queued: replayed after a fix, with fresh attempts.
    StepStatus.DEAD: {StepStatus.QUEUED},
}


class IllegalTransition(RuntimeError):
    pass


def check_run_transition(from_: tuple[str, ...], to: str) -> None:
    _check(RUN_TRANSITIONS, "run", from_, to)


def check_step_transition(from_: tuple[str, ...], to: str) -> None:
    _check(STEP_TRANSITIONS, "step", from_, to)


def _check(table: dict[str, set[str]], kind: str, from_: tuple[str, ...], to: str) -> None:
    for status in from_:
        if to not in table.get(status, set()):
            raise IllegalTransition(f"{kind} cannot go from {status} to {to}")


# How a stop reads where it shows. A step that ran out of time (its node's ttl_s or the
# run's deadline) is skipped with reason DEADLINE; one stopped by a budget with BUDGET_SKIP.
DEADLINE = "deadline"
BUDGET_SKIP = "budget exceeded"

# The stop signal each ending of a run sends to the engines (operators.base.stop_exception):
# a run stopped for failing only ever fails by expiring.
STOP_SIGNALS: dict[str, str] = {
    RunStatus.CANCELLED: "cancelled",
    RunStatus.FAILED: "deadline",
    RunStatus.BUDGET_EXCEEDED: "budget_exceeded",
}

# The audit action of each way a run is stopped.
STOP_ACTIONS: dict[str, str] = {
    RunStatus.CANCELLED: "run.cancel",
    RunStatus.FAILED: "run.expire",
    RunStatus.BUDGET_EXCEEDED: "run.budget_exceeded",
}


def stop_signal_for(run_status: str) -> str:
    return STOP_SIGNALS.get(run_status, run_status)


MAX_BACKOFF_S = 300.0


def retry_delay_s(node: dict[str, Any], attempt: int) -> float:
    return jittered_backoff_s(node_backoff_s(node), attempt, MAX_BACKOFF_S)


def jittered_backoff_s(base_s: float, attempt: int, cap_s: float) -> float:
    """base_s * 2^(attempt-1), capped, then a random half of it taken off ("equal
    jitter"), so things that failed together do not all come back at the same instant."""
    delay = min(base_s * 2 ** min(attempt - 1, 30), cap_s)
    return delay / 2 + random.uniform(0, delay / 2)


def attempt_label(attempt: int, most: int, error: str) -> str:
    return f"attempt {attempt}/{most}: {error}"


def dead_reason(
    attempt: int, most: int, error: str, *, permanent: bool, retry_taken: bool | None
) -> str | None:
    """The one retry-or-dead decision, for workers and the sweeper alike: the error to
    dead-letter a failed attempt with, or None when it is tried again. `retry_taken` is
    whether the run's retry budget gave this attempt a retry (None: not asked, because a
    permanent error or the last attempt never retries)."""
    label = attempt_label(attempt, most, error)
    if permanent or attempt >= most:
        return label
    if not retry_taken:
        return (
            f"{label}; not retried: the run's retry budget is spent"
            f" ({settings.SLUICE_RETRY_BUDGET_RATIO:.0%} of its steps"
            f" + {settings.SLUICE_RETRY_BUDGET_MIN})"
        )
    return None


def may_retry(attempt: int, most: int, *, permanent: bool) -> bool:
    """Whether a failed attempt could be retried at all (before asking the retry budget)."""
    return not permanent and attempt < most
