"""A tenant's quotas, set by its owners in Settings and checked when a run starts:

- `max_active_runs`: runs queued or running at once;
- `max_run_budget_usd`: the largest `policies.budget_usd` a run may get. With it set, a
  graph without a run budget is refused too (it would run unbounded).

`monthly_budget_usd` is validated here as well; it is metered while tokens are generated
(apps.runs.budgets). None means no limit for each of them.

The active-run count is checked inside the run's transaction with the tenant's row locked,
so two runs started at the same instant cannot both take the last place. Tenants with no
limit take no lock."""

from decimal import Decimal, InvalidOperation
from typing import Any

from apps.tenants.models import Tenant

MAX_USD = Decimal("100000")
MAX_ACTIVE_RUNS = 10_000
USD_FIELDS = ("monthly_budget_usd", "max_run_budget_usd")
QUOTA_FIELDS = (*USD_FIELDS, "max_active_runs")


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


def check_run_quotas(tenant_id: int, policies: dict[str, Any]) -> None:
    """Raises InvalidInput (apps.runs.services) when a new run of a graph with these
    policies would break one of the tenant's quotas. Call inside the transaction that
    creates the run. The tenant is read afresh: a Tenant cached on a graph version may
    predate a change in Settings."""
    # Imported here: apps.runs.services imports this module.
    from apps.runs.models import ACTIVE_RUN_STATUSES, Run
    from apps.runs.services import InvalidInput

    tenant = Tenant.objects.only("name", "max_active_runs", "max_run_budget_usd").get(pk=tenant_id)

    if tenant.max_active_runs is not None:
        # Starts of this tenant's runs queue here until the one ahead has committed its run.
        list(Tenant.objects.select_for_update().filter(pk=tenant_id).values_list("pk"))
        active = Run.unscoped_all_tenants.filter(
            tenant_id=tenant.pk, status__in=ACTIVE_RUN_STATUSES
        ).count()
        if active >= tenant.max_active_runs:
            raise InvalidInput(
                f"{tenant.name} has {active} run{'s' if active != 1 else ''} active; its limit"
                f" is {tenant.max_active_runs}. Wait for one to finish or raise the limit in"
                " Settings."
            )
    if tenant.max_run_budget_usd is not None:
        limit = tenant.max_run_budget_usd
        if "budget_usd" not in policies:
            raise InvalidInput(
                f"{tenant.name} allows at most {usd(limit)} per run, and this graph sets no"
                f" policies.budget_usd. Set one of at most {usd(limit)} in the graph, or clear"
                " the limit in Settings."
            )
        asked = Decimal(str(policies["budget_usd"]))
        if asked > limit:
            raise InvalidInput(
                f"This graph's policies.budget_usd is {usd(asked)}; {tenant.name} allows at"
                f" most {usd(limit)} per run. Lower it in the graph or raise the limit in"
                " Settings."
            )
