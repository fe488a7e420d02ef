"""When a failed attempt is tried again: the node's exponential backoff with jitter, and the
run's retry budget, so a failing dependency cannot multiply the load on itself."""

import random
from typing import Any
from uuid import UUID

from django.conf import settings
from django.db import connection

from apps.graphs.validation import node_backoff_s

MAX_BACKOFF_S = 300.0


def retry_delay_s(node: dict[str, Any], attempt: int) -> float:
    return jittered_backoff_s(node_backoff_s(node), attempt, MAX_BACKOFF_S)


def jittered_backoff_s(base_s: float, attempt: int, cap_s: float) -> float:
    """base_s * 2^(attempt-1), capped, then a random half of it taken off ("equal
    jitter"), so things that failed together do not all come back at the same instant."""
    delay = min(base_s * 2 ** min(attempt - 1, 30), cap_s)
    return delay / 2 + random.uniform(0, delay / 2)


def give_up_reason(
    run_id: UUID, tenant_id: int, attempt: int, most: int, error: str, *, permanent: bool = False
) -> str | None:
    """The error to dead-letter a failed attempt with, or None when it may be retried (one
    retry is then taken from the run's budget). Workers and the sweeper decide alike."""
    label = f"attempt {attempt}/{most}: {error}"
    if permanent or attempt >= most:
        return label
    if not take_retry(run_id, tenant_id):
        return (
            f"{label}; not retried: the run's retry budget is spent"
            f" ({settings.SLUICE_RETRY_BUDGET_RATIO:.0%} of its steps"
            f" + {settings.SLUICE_RETRY_BUDGET_MIN})"
        )
    return None


def take_retry(run_id: UUID, tenant_id: int) -> bool:
    """Spends one retry from the run's budget; False when it is spent. The budget grows with
    the run: SLUICE_RETRY_BUDGET_RATIO of its steps plus SLUICE_RETRY_BUDGET_MIN."""
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE runs_run SET retries = retries + 1"
            " WHERE id = %s AND tenant_id = %s AND retries <"
            " (SELECT count(*) FROM runs_step WHERE run_id = %s) * %s + %s"
            " RETURNING retries",
            [
                run_id,
                tenant_id,
                run_id,
                settings.SLUICE_RETRY_BUDGET_RATIO,
                settings.SLUICE_RETRY_BUDGET_MIN,
            ],
        )
        return cursor.fetchone() is not None
