"""A tenant's quotas, set by its owners in Settings and checked when a run starts:

- `max_active_runs`: runs queued or running at once;
- `max_run_budget_usd`: the largest `policies.budget_usd` a run may get. With it set, a
  graph without a run budget is refused too (it would run unbounded).

`monthly_budget_usd` is validated here as well; it is metered while tokens are generated
(apps.runs.engine.budgets). None means no limit for each of them.

Starting a run checks them (apps.runs.services.check_run_quotas).

Settings also holds `feed_retention_days`, a limit on what is kept rather than on what runs
use: how long a finished run keeps its live feed's frames before the sweeper prunes them
(apps.live.retention). It always has a value."""

from decimal import Decimal, InvalidOperation
from typing import Any

MAX_USD = Decimal("100000")
MAX_ACTIVE_RUNS = 10_000
USD_FIELDS = ("monthly_budget_usd", "max_run_budget_usd")
QUOTA_FIELDS = (*USD_FIELDS, "max_active_runs")
FEED_RETENTION_DAYS_DEFAULT = 30
FEED_RETENTION_DAYS_MAX = 3650  # ten years: past that, "forever" is what is meant
# What the Settings page writes: the quotas, the budget and the feed's retention.
SETTINGS_FIELDS = (*QUOTA_FIELDS, "feed_retention_days")


def usd(value: Decimal) -> str:
    return f"${format(value.normalize(), 'f')}"


def check_quota_value(field: str, value: Any) -> str | None:
    """What is wrong with `value` for `field`, or None (None itself is always fine)."""
    if value is None:
        return None
    if field == "max_active_runs":
        if not isinstance(value, int) or isinstance(value, bool):
            return "Enter a whole number."
        if not 1 <= value <= MAX_ACTIVE_RUNS:
            return f"Enter a number from 1 to {MAX_ACTIVE_RUNS}, or leave it empty for no limit."
        return None
    try:
        amount = Decimal(value)
    except (InvalidOperation, TypeError, ValueError):
        return "Enter an amount in US dollars, like 25 or 12.50."
    if not amount.is_finite() or amount < 0:
        return "Enter an amount of zero or more."
    if amount > MAX_USD:
        return f"Enter at most {usd(MAX_USD)}, or leave it empty for no limit."
    if amount.as_tuple().exponent < -6:  # type: ignore[operator]
        return "Use at most 6 decimal places."
    return None


def check_feed_retention_days(value: Any) -> str | None:
    """What is wrong with `value` as days to keep a finished run's feed, or None."""
    if not isinstance(value, int) or isinstance(value, bool):
        return "Enter a whole number of days."
    if not 1 <= value <= FEED_RETENTION_DAYS_MAX:
        return f"Enter a number of days from 1 to {FEED_RETENTION_DAYS_MAX}."
    return None


def check_setting_value(field: str, value: Any) -> str | None:
    """What is wrong with `value` for one of SETTINGS_FIELDS, or None."""
    if field == "feed_retention_days":
        return check_feed_retention_days(value)
    return check_quota_value(field, value)
