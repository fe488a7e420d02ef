"""The providers page: flow control's state per model, grouped by provider (the breaker,
the adaptive concurrency limit against the permits in flight, the RPM and TPM buckets, a
Retry-After pause, the retry budget), read from Redis without changing it
(workers/flow/snapshot.py); beside each model, how many of the signed-in member's tenant's
steps wait in its queue, and how many of those flow control sent back to wait.

Provider state is platform-wide: every tenant's calls share the same limits. The registry is
the tenant's view of it (its overrides of quality and fallbacks); the queue figures are the
tenant's own (tenant-scoped manager). The table reloads itself every few seconds (htmx)."""

from dataclasses import dataclass

from django.db.models import Count, Q
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET
from redis.exceptions import RedisError

from apps.runs.models import CLAIMABLE_STEP_STATUSES, Step
from apps.tenants.access import membership_of, tenant_member_required
from workers.flow.snapshot import ModelFlow, provider_states
from workers.inference.registry import ModelSpec, models_for

REFRESH_S = 3
BREAKER_BADGES = {"closed": "done", "open": "failed", "half_open": "skipped"}  # their colours


@dataclass(frozen=True)
class Waiting:
    """The tenant's steps waiting in one model's queue."""

    steps: int = 0
    with_reason: int = 0  # sent back by flow control, with the reason shown on the step
    shed: int = 0  # of those, shed because higher-priority work goes first


@dataclass(frozen=True)
class ModelRow:
    flow: ModelFlow
    waiting: Waiting

    @property
    def badge(self) -> str:
        figures = self.flow.figures
        return BREAKER_BADGES[figures.breaker.state] if figures is not None else ""


@dataclass(frozen=True)
class ProviderGroup:
    provider: str | None  # None: the models that are not flow-controlled
    rows: list[ModelRow]


def waiting_by_queue(models: dict[str, ModelSpec]) -> dict[str, Waiting]:
    """The current tenant's waiting steps per model queue, in one query."""
    rows = (
        Step.objects.filter(
            status__in=CLAIMABLE_STEP_STATUSES,
            queue__in=[spec.queue for spec in models.values()],
        )
        .values("queue")
        .annotate(
            steps=Count("id"),
            with_reason=Count("id", filter=~Q(waiting="")),
            shed=Count("id", filter=Q(waiting__startswith="shed:")),
        )
        .order_by()
    )
    return {row["queue"]: Waiting(row["steps"], row["with_reason"], row["shed"]) for row in rows}


def _groups(flows: list[ModelFlow], waiting: dict[str, Waiting]) -> list[ProviderGroup]:
    groups: list[ProviderGroup] = []
    for flow in flows:  # already ordered by provider, the uncontrolled last
        if not groups or groups[-1].provider != flow.provider:
            groups.append(ProviderGroup(flow.provider, []))
        groups[-1].rows.append(ModelRow(flow, waiting.get(flow.queue, Waiting())))
    return groups


def _context(request: HttpRequest) -> dict[str, object]:
    models = models_for(membership_of(request).tenant.model_overrides)
    waiting = waiting_by_queue(models)
    context: dict[str, object] = {
        "refresh_s": REFRESH_S,
        "waiting_steps": sum(w.steps for w in waiting.values()),
        "waiting_with_reason": sum(w.with_reason for w in waiting.values()),
    }
    try:
        flows = provider_states(models)
    except RedisError as exc:
        return {**context, "groups": [], "redis_error": str(exc) or type(exc).__name__}
    return {
        **context,
        "groups": _groups(flows, waiting),
        "controlled": sum(flow.controlled for flow in flows),
    }


@require_GET
@tenant_member_required
def providers(request: HttpRequest) -> HttpResponse:
    return render(request, "runs/providers.html", _context(request))


@require_GET
@tenant_member_required
def provider_figures(request: HttpRequest) -> HttpResponse:
    """The figures alone, for the page's htmx polling."""
    return render(request, "runs/partials/providers.html", _context(request))
