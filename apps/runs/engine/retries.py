"""What happens to a failed attempt: dead, or retried at the cost of one retry from the
run's budget. Worker and sweeper both decide here, in the transaction that then writes the
step's new status, so a retry is never spent without the step being queued for it."""

from django.conf import settings

from apps.runs.engine import store
from apps.runs.engine.states import dead_reason, may_retry
from apps.runs.models import Run


def dead_or_retry(run: Run, attempt: int, most: int, error: str, *, permanent: bool) -> str | None:
    """The error to dead-letter the step with, or None when it is retried (a retry taken)."""
    taken = None
    if may_retry(attempt, most, permanent=permanent):
        taken = store.take_retry(
            run.id,
            run.tenant_id,
            settings.SLUICE_RETRY_BUDGET_RATIO,
            settings.SLUICE_RETRY_BUDGET_MIN,
        )
    return dead_reason(attempt, most, error, permanent=permanent, retry_taken=taken)
