"""Batch jobs: many inputs as one batch run, with the pre-flight estimate kept beside it and
an optional completion webhook. Accepting a job is one transaction: run, input events,
source steps, job row and audit entry, or nothing."""

from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from django.db import transaction
from django.utils import timezone

from apps.api.estimates import InputProfile, estimate_version
from apps.api.models import BatchJob, WebhookStatus
from apps.audit.services import Actor
from apps.graphs.models import GraphVersion
from apps.runs.intake import Item, start_batch
from apps.runs.models import FINAL_STEP_STATUSES, Event, Step, StepStatus
from apps.secrets.crypto import encrypt

# Failed items listed on a job's page; the run page has them all.
FAILED_ITEMS_SHOWN = 100


@dataclass(frozen=True)
class JobRequest:
    version: GraphVersion
    inputs: list[Any]
    profile: InputProfile
    webhook_url: str = ""
    webhook_secret: str = ""
    budget_usd: Decimal | None = None
    deadline_s: float | None = None


def submit_job(request: JobRequest, *, actor: Actor) -> BatchJob:
    estimate = estimate_version(request.version, request.profile)
    policy_budget = request.version.spec.get("policies", {}).get("budget_usd")
    budget = request.budget_usd
    if budget is None and policy_budget is not None:
        # The graph's budget is per run; a batch of n items may spend n runs' worth.
        budget = Decimal(str(policy_budget)) * len(request.inputs)
    items = [Item(payload, key=str(index)) for index, payload in enumerate(request.inputs)]
    with transaction.atomic():
        run = start_batch(
            version=request.version,
            items=items,
            actor=actor,
            budget_usd=budget,
            deadline_s=request.deadline_s,
        )
        return BatchJob.objects.create(
            run=run,
            items=len(items),
            estimate=estimate,
            webhook_url=request.webhook_url,
            webhook_secret=encrypt(request.webhook_secret) if request.webhook_secret else "",
            webhook_status=WebhookStatus.PENDING if request.webhook_url else WebhookStatus.NONE,
            created_by=actor if getattr(actor, "is_authenticated", False) else None,
        )


def progress(job: BatchJob, per_node: dict[str, dict[str, int]]) -> dict[str, Any]:
    """Steps settled against steps expected (the estimate, or what exists if more), and the
    time left at the pace so far."""
    created = sum(sum(counts.values()) for counts in per_node.values())
    settled = sum(counts[status] for counts in per_node.values() for status in FINAL_STEP_STATUSES)
    expected = max(created, int(job.estimate.get("steps", {}).get("total", 0)))
    run = job.run
    if not run.is_active:
        return {
            "settled_steps": settled,
            "expected_steps": settled,
            "fraction": 1.0,
            "eta_seconds": 0.0,
        }
    elapsed = (timezone.now() - job.created_at).total_seconds()
    rate = settled / elapsed if elapsed > 0 else 0.0
    eta = (expected - settled) / rate if rate > 0 else None
    return {
        "settled_steps": settled,
        "expected_steps": expected,
        "fraction": round(settled / expected, 4) if expected else 0.0,
        "eta_seconds": round(eta, 1) if eta is not None else None,
    }


def failed_items(job: BatchJob) -> list[dict[str, Any]]:
    """Items with a dead step: which item, at which node, and why."""
    dead = Step.objects.filter(run_id=job.run_id, status=StepStatus.DEAD).order_by("created_at")
    rows = list(dead.values("node_id", "error", "inputs")[:FAILED_ITEMS_SHOWN])
    keys = dict(
        Event.objects.filter(
            run_id=job.run_id, id__in=[r["inputs"][0] for r in rows if r["inputs"]]
        ).values_list("id", "key")
    )
    return [
        {
            "item": _item(keys.get(row["inputs"][0], "")) if row["inputs"] else None,
            "node": row["node_id"],
            "error": row["error"],
        }
        for row in rows
    ]


def _item(key: str) -> int | None:
    return int(key) if key.isdigit() else None
