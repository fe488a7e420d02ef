"""Starting and stopping runs. Each write is one transaction with its audit row; messages
to workers leave on commit."""

import json
from datetime import timedelta
from decimal import Decimal
from functools import lru_cache
from typing import Any

import jsonschema
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from apps.audit.services import Actor, actor_label, record
from apps.graphs.access import version_spec
from apps.graphs.models import GraphVersion
from apps.graphs.validation import source_node
from apps.live.publisher import FEED
from apps.runs.dispatch import StepMessage, send_on_commit
from apps.runs.models import (
    ACTIVE_RUN_STATUSES,
    CLAIMABLE_STEP_STATUSES,
    Event,
    Run,
    RunKind,
    RunStatus,
    Step,
)
from apps.runs.stepflow import DEADLINE, new_step
from apps.runs.transitions import skip_waiting_steps, transition_run
from apps.tenants.quotas import check_run_quotas
from workers.control import publish_stop_on_commit

MAX_INPUT_BYTES = 1024 * 1024
BUDGET_SKIP = "budget exceeded"


class InvalidInput(ValueError):
    """The run's input was refused; the message says which part and why."""


@lru_cache(maxsize=256)
def input_validator(version_id: int) -> jsonschema.Draft202012Validator | None:
    """The source's input schema, compiled once per version (versions are immutable): a
    batch checks thousands of inputs against it."""
    schema = source_node(version_spec(version_id)).get("config", {}).get("input_schema")
    return jsonschema.Draft202012Validator(schema) if schema else None


def check_input(version: GraphVersion, payload: Any) -> dict[str, Any]:
    if not isinstance(payload, dict):
        raise InvalidInput(f"input must be a JSON object, got {type(payload).__name__}")
    size = len(json.dumps(payload).encode())
    if size > MAX_INPUT_BYTES:
        raise InvalidInput(f"input is {size} bytes; the limit is {MAX_INPUT_BYTES} bytes")
    validator = input_validator(version.pk)
    if validator is not None:
        error = jsonschema.exceptions.best_match(validator.iter_errors(payload))
        if error is not None:
            where = ".".join(str(p) for p in error.absolute_path) or "input"
            raise InvalidInput(f"{where}: {error.message}")
    return payload


def start_run(
    *, version: GraphVersion, payload: Any, actor: Actor, kind: RunKind = RunKind.INTERACTIVE
) -> Run:
    """Creates the run, its input event and the source step in one transaction."""
    payload = check_input(version, payload)
    policies = version.spec.get("policies", {})
    now = timezone.now()
    with transaction.atomic():
        check_run_quotas(version.tenant_id, policies)
        run = Run.objects.create(
            graph_version=version,
            kind=kind,
            input=payload,
            deadline=now + timedelta(seconds=policies["ttl_s"]) if "ttl_s" in policies else None,
            budget_usd=Decimal(str(policies["budget_usd"])) if "budget_usd" in policies else None,
            on_disconnect=policies.get("on_disconnect", "detach"),
            disconnect_grace_s=policies.get("disconnect_grace_s"),
            open_steps=1,
            created_by=actor if getattr(actor, "is_authenticated", False) else None,
        )
        event = Event.objects.create(
            run=run, node_id="input", port="out", payload=payload, event_time=now
        )
        step = new_step(run, source_node(version.spec), [event.id], [])
        step.save()
        record_start(run, version, actor)
        send_on_commit([StepMessage(run.tenant_id, step.id, step.queue)])
        transaction.on_commit(lambda: FEED.run_started(run.id))  # its live feed, numbered from 1
    return run


def record_start(run: Run, version: GraphVersion, actor: Actor, **details: Any) -> None:
    """The audit entry of a run's start, whatever its kind, in the run's transaction."""
    record(
        tenant=run.tenant,
        actor=actor,
        action="run.start",
        target_type="run",
        target_id=run.id,
        after={
            "graph": version.graph.slug,
            "version": version.number,
            "kind": RunKind(run.kind).value,
            **details,
        },
    )


STOP_ACTIONS: dict[str, str] = {
    RunStatus.CANCELLED: "run.cancel",
    RunStatus.FAILED: "run.expire",
    RunStatus.BUDGET_EXCEEDED: "run.budget_exceeded",
}


# The stop signal each ending sends to the engines (operators.base.stop_exception): a run
# stopped for failing only ever fails by expiring.
STOP_SIGNALS: dict[str, str] = {
    RunStatus.CANCELLED: "cancelled",
    RunStatus.FAILED: "deadline",
    RunStatus.BUDGET_EXCEEDED: "budget_exceeded",
}


def stop_run(
    run: Run, *, to: str, reason: str, actor: Actor, skip_reason: str | None = None
) -> bool:
    """Cancel (or expire) a run: it stops at once; waiting steps are skipped (with
    `skip_reason`, else `reason`); engines generating for it abort within a decode step
    (the control channel), other running steps learn of it at their next heartbeat, and
    none commits anything. False if it had already ended."""
    now = timezone.now()
    with transaction.atomic():
        stopped = transition_run(
            run, from_=ACTIVE_RUN_STATUSES, to=to, error=reason, finished_at=now
        )
        if stopped:
            # Engines generating for this run abort within a decode step, not at the next
            # heartbeat (workers/control.py).
            publish_stop_on_commit(STOP_SIGNALS[to], runs=[run.id], detail=reason)
            record(
                tenant=run.tenant,
                actor=actor,
                action=STOP_ACTIONS[to],
                target_type="run",
                target_id=run.id,
                before={"status": run.status},
                after={"status": to, "reason": reason},
            )
    if stopped:
        skip_waiting(run, skip_reason or reason)
    return stopped


def skip_waiting(run: Run, reason: str) -> None:
    """Skips the run's queued steps. A step locked by a worker mid-claim is passed over here;
    that worker sees the stopped run and skips it itself."""
    with transaction.atomic():
        waiting = list(
            Step.objects.select_for_update(skip_locked=True)
            .filter(run_id=run.id, status__in=CLAIMABLE_STEP_STATUSES)
            .values_list("id", flat=True)
        )
        skipped = skip_waiting_steps(waiting, reason=reason, finished_at=timezone.now())
        Run.objects.filter(id=run.id).update(open_steps=F("open_steps") - skipped)


def expire_run(run: Run) -> bool:
    """The run's deadline passed: it fails, and its waiting steps are skipped as `deadline`."""
    return stop_run(
        run, to=RunStatus.FAILED, reason="deadline passed", skip_reason=DEADLINE, actor=None
    )


def cancel_run(run: Run, *, actor: Actor) -> bool:
    return stop_run(
        run, to=RunStatus.CANCELLED, reason=f"cancelled by {actor_label(actor)}", actor=actor
    )


def exceed_budget(run: Run, reason: str) -> bool:
    """A budget was crossed: the run ends `budget_exceeded`, its error stating the figure."""
    return stop_run(
        run, to=RunStatus.BUDGET_EXCEEDED, reason=reason, skip_reason=BUDGET_SKIP, actor=None
    )


def cancel_abandoned(run: Run, *, viewers_gone_s: float) -> bool:
    """The last viewer left `viewers_gone_s` ago (the grace period; Realtime keeps the time).
    A run whose policy is `on_disconnect: cancel` is cancelled, so no generation outlives
    the only person reading it; a `detach` run goes on. True when it was cancelled."""
    if run.on_disconnect != "cancel":
        return False
    reason = f"cancelled: no viewer for {viewers_gone_s:.0f}s (on_disconnect: cancel)"
    return stop_run(run, to=RunStatus.CANCELLED, reason=reason, actor=None)
