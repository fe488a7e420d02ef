"""Starting and stopping runs. Each write is one transaction with its audit row; messages
to workers leave on commit."""

import json
from datetime import timedelta
from decimal import Decimal
from functools import lru_cache
from typing import Any

import jsonschema
from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.utils import timezone

from apps.audit.models import AuditEntry
from apps.audit.services import Actor, actor_label, new_entry
from apps.graphs.access import version_spec
from apps.graphs.models import GraphVersion
from apps.graphs.validation import source_node
from apps.live.publisher import FEED
from apps.runs import engine
from apps.runs.engine import store
from apps.runs.models import ACTIVE_RUN_STATUSES, Event, Run, RunKind, RunStatus
from apps.tenants.models import Tenant
from apps.tenants.quotas import usd
from workers import storable

MAX_INPUT_BYTES = 1024 * 1024


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
    if storable.too_deep(payload):
        raise InvalidInput(f"input {storable.TOO_DEEP}")
    if storable.unstorable(payload):
        raise InvalidInput(f"input {storable.PROBLEM}")
    validator = input_validator(version.pk)
    if validator is not None:
        error = jsonschema.exceptions.best_match(validator.iter_errors(payload))
        if error is not None:
            where = ".".join(str(p) for p in error.absolute_path) or "input"
            raise InvalidInput(f"{where}: {error.message}")
    return payload


def check_run_quotas(tenant_id: int, policies: dict[str, Any]) -> None:
    """Raises InvalidInput when a new run of a graph with these
    policies would break one of the tenant's quotas. Call inside the transaction that
    creates the run. The tenant is read afresh: a Tenant cached on a graph version may
    predate a change in Settings."""
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


def start_run(
    *, version: GraphVersion, payload: Any, actor: Actor, kind: RunKind = RunKind.INTERACTIVE
) -> Run:
    """Creates the run, its input event and the source step in one transaction."""
    payload = check_input(version, payload)
    policies = version.spec.get("policies", {})
    now = timezone.now()
    run = Run(
        tenant_id=version.tenant_id,
        graph_version=version,
        kind=kind,
        input=payload,
        deadline=now + timedelta(seconds=policies["ttl_s"]) if "ttl_s" in policies else None,
        budget_usd=Decimal(str(policies["budget_usd"])) if "budget_usd" in policies else None,
        on_disconnect=policies.get("on_disconnect", "detach"),
        disconnect_grace_s=policies.get("disconnect_grace_s"),
        created_by_id=actor.pk if isinstance(actor, AbstractBaseUser) else None,
    )
    event = Event(
        tenant_id=run.tenant_id,
        run=run,
        node_id="input",
        port="out",
        payload=payload,
        event_time=now,
    )
    source = source_node(version.spec)
    # The common start, a tenant without run quotas, is one statement (bench overhead).
    if engine.start_at_once(run, source, event, start_entry(run, version, actor)):
        run._state.adding, run._state.db = False, "default"  # saved: save() now updates it
        transaction.on_commit(lambda: FEED.run_started(run.id))  # its feed, numbered from 1
        return run
    with transaction.atomic():
        check_run_quotas(version.tenant_id, policies)
        store.insert_run(run)
        event.save()
        engine.enqueue(run, source, [event])
        record_start(run, version, actor)
        transaction.on_commit(lambda: FEED.run_started(run.id))  # its live feed, numbered from 1
    return run


def record_start(run: Run, version: GraphVersion, actor: Actor, **details: Any) -> None:
    """The audit entry of a run's start, whatever its kind, in the run's transaction."""
    start_entry(run, version, actor, **details).save()


def start_entry(run: Run, version: GraphVersion, actor: Actor, **details: Any) -> AuditEntry:
    return new_entry(
        tenant_id=run.tenant_id,
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


def cancel_run(run: Run, *, actor: Actor) -> bool:
    return engine.stop_run(
        run, to=RunStatus.CANCELLED, reason=f"cancelled by {actor_label(actor)}", actor=actor
    )


def cancel_abandoned(run: Run, *, viewers_gone_s: float) -> bool:
    """The last viewer left `viewers_gone_s` ago (the grace period; Realtime keeps the time).
    A run whose policy is `on_disconnect: cancel` is cancelled, so no generation outlives
    the only person reading it; a `detach` run goes on. True when it was cancelled."""
    if run.on_disconnect != "cancel":
        return False
    reason = f"cancelled: no viewer for {viewers_gone_s:.0f}s (on_disconnect: cancel)"
    return engine.stop_run(run, to=RunStatus.CANCELLED, reason=reason, actor=None)
