"""Deploying a stream graph and operating the deployment: pause, resume, drain and stop,
redeploy, replay a dead letter. Each change and its audit entry are one transaction."""

import secrets
import uuid
from typing import Any

from django.db import transaction
from django.db.models import Count
from django.utils import timezone

from apps.audit.services import Actor, record
from apps.graphs.models import GraphVersion, StreamGraph
from apps.graphs.validation import source_node
from apps.runs.engine import store
from apps.runs.models import Run, RunKind
from apps.runs.services import check_run_quotas, record_start
from apps.secrets.crypto import encrypt
from apps.streams.checkpoint import produce, write_outcomes
from apps.streams.drain import release_run, stop_deployment
from apps.streams.models import (
    SOURCE_KINDS,
    DeadLetter,
    Deployment,
    DeploymentStatus,
    KeyedState,
    SourceKind,
)
from apps.streams.segment import Record, Segment, SegmentError
from apps.tenants.context import current_tenant
from workers import kafka
from workers.operators.base import PermanentError
from workers.operators.streams import KafkaSource
from workers.operators.windows import state_owners


class DeploymentRefused(Exception):
    """The deployment cannot be made or changed; the message says why and what to do."""


def check_deployable(version: GraphVersion, tenant_slug: str) -> str:
    """The version's source kind, or DeploymentRefused naming the problem."""
    spec = version.spec
    source = source_node(spec)
    kind = SOURCE_KINDS.get(source["type"])
    if kind is None:
        raise DeploymentRefused(
            f"version {version.number} starts with {source['type']}; a stream deployment needs"
            " source.kafka, source.webhook or source.schedule (start other graphs as runs)"
        )
    problems = topic_problems(spec, tenant_slug)
    if problems:
        raise DeploymentRefused("; ".join(problems))
    if kind == SourceKind.KAFKA or any(n["type"] == "sink.kafka" for n in spec["nodes"]):
        try:
            kafka.bootstrap_servers()
        except kafka.KafkaUnavailable as exc:
            raise DeploymentRefused(str(exc)) from None
    return kind


def topic_problems(spec: dict[str, Any], tenant_slug: str) -> list[str]:
    """Every Kafka topic the spec names that this tenant may not use, with its node."""
    return [
        f"node '{node_id}': {problem}"
        for node_id, _field, problem in kafka.spec_topic_problems(spec, tenant_slug)
    ]


def deploy(*, graph: StreamGraph, version: GraphVersion, actor: Actor) -> Deployment:
    """Starts the graph's stream deployment on `version`, or moves it there (a redeploy):
    the new version takes over each partition at the offset PostgreSQL holds when this
    commits, and no batch processed with the old version commits after it."""
    tenant = current_tenant()
    if version.graph_id != graph.pk:
        raise DeploymentRefused(f"version {version.number} is not a version of this graph")
    kind = check_deployable(version, tenant.slug)
    with transaction.atomic(durable=True):
        deployment = Deployment.objects.select_for_update().filter(graph=graph).first()
        active = deployment is not None and deployment.status != DeploymentStatus.STOPPED
        if deployment is not None and deployment.source_kind != kind:
            if active:
                raise DeploymentRefused(
                    f"this graph's deployment reads from {deployment.source_kind}; version"
                    f" {version.number} reads from {kind}: drain it, then deploy the new version"
                )
            _change_source(deployment, kind)
        if deployment is not None and active and deployment.version_id == version.pk:
            return deployment  # already there
        run = _open_run(version, actor)
        if deployment is None:
            deployment = Deployment.objects.create(
                tenant=tenant,
                graph=graph,
                version=version,
                run=run,
                source_kind=kind,
                group_id=f"sluice.{tenant.slug}.{uuid.uuid4().hex}",
                webhook_secret=encrypt(new_webhook_secret()) if kind == SourceKind.WEBHOOK else "",
                created_by=actor if getattr(actor, "is_authenticated", False) else None,
            )
            _audit(deployment, actor, "deployment.create", None, {"version": version.number})
            return deployment
        before = {"version": deployment.version.number, "status": deployment.status}
        dropped = drop_changed_state(deployment, version)
        if dropped:
            before["state"] = {entry["owner"]: entry["entries"] for entry in dropped}
        if active:
            release_run(deployment)
        deployment.version = version
        deployment.run = run
        if not active:
            deployment.status = DeploymentStatus.RUNNING
            _skip_missed_ticks(deployment)
        deployment.save(
            update_fields=[
                "version", "run", "status", "last_tick_at", "source_kind", "webhook_secret",
                "updated_at",
            ]
        )  # fmt: skip
        after = {"version": version.number, "status": deployment.status}
        _audit(deployment, actor, "deployment.redeploy", before, after)
    return deployment


def state_to_drop(deployment: Deployment, version: GraphVersion) -> list[dict[str, Any]]:
    """What deploying `version` would drop of the deployment's state: the entries (open
    windows, memory lists) of every owner whose nodes' id or config changes or goes. An owner
    whose nodes stay exactly as they are keeps its state."""
    before = _owner_nodes(deployment.version.spec)
    after = _owner_nodes(version.spec)
    changed = [owner for owner, nodes in before.items() if after.get(owner) != nodes]
    if not changed:
        return []
    counts = dict(
        KeyedState.objects.filter(deployment=deployment, owner__in=changed)
        .values_list("owner")
        .annotate(entries=Count("id"))
    )
    return [
        {
            "owner": owner,
            "nodes": [node_id for node_id, _type, _config in before[owner]],
            "entries": counts.get(owner, 0),
            "reason": "removed" if owner not in after else "config changed",
        }
        for owner in sorted(changed)
    ]


def _owner_nodes(spec: dict[str, Any]) -> dict[str, list[tuple[str, str, Any]]]:
    """Each state owner with the (id, type, config) of its nodes: what must stay the same."""
    return {
        owner: sorted((n["id"], n["type"], n.get("config", {})) for n in nodes)
        for owner, nodes in state_owners(spec).items()
    }


def drop_changed_state(deployment: Deployment, version: GraphVersion) -> list[dict[str, Any]]:
    """In the redeploy's transaction: the state `version` cannot use goes."""
    dropped = state_to_drop(deployment, version)
    if dropped:
        KeyedState.objects.filter(
            deployment=deployment, owner__in=[entry["owner"] for entry in dropped]
        ).delete()
    return dropped


def _change_source(deployment: Deployment, kind: str) -> None:
    """A stopped deployment deployed again with another kind of source."""
    deployment.source_kind = kind
    if kind == SourceKind.WEBHOOK and not deployment.webhook_secret:
        deployment.webhook_secret = encrypt(new_webhook_secret())


def new_webhook_secret() -> str:
    return "whsec_" + secrets.token_urlsafe(32)


def _open_run(version: GraphVersion, actor: Actor) -> Run:
    check_run_quotas(version.tenant_id, {})
    run = store.create_run(
        graph_version=version,
        kind=RunKind.STREAM,
        input={},
        on_disconnect="detach",
        open_steps=1,  # the hold: the run stays open while the deployment takes events
        created_by=actor if getattr(actor, "is_authenticated", False) else None,
    )
    record_start(run, version, actor)
    return run


def pause(deployment: Deployment, *, actor: Actor) -> Deployment:
    """Stop taking records; Kafka workers keep the group's partitions."""
    return _move(deployment, (DeploymentStatus.RUNNING,), DeploymentStatus.PAUSED, actor)


def resume(deployment: Deployment, *, actor: Actor) -> Deployment:
    return _move(deployment, (DeploymentStatus.PAUSED,), DeploymentStatus.RUNNING, actor)


def drain(deployment: Deployment, *, actor: Actor) -> Deployment:
    """Kafka: take what the topics hold now, then stop. A webhook or schedule has nothing
    buffered: it stops at once."""
    if deployment.source_kind != SourceKind.KAFKA:
        with transaction.atomic(durable=True):
            locked = _locked(deployment)
            if locked.status == DeploymentStatus.STOPPED:
                raise DeploymentRefused("the deployment is already stopped")
            stop_deployment(locked, actor=actor, action="deployment.stop")
        return locked
    return _move(
        deployment,
        (DeploymentStatus.RUNNING, DeploymentStatus.PAUSED),
        DeploymentStatus.DRAINING,
        actor,
    )


def _move(deployment: Deployment, from_: tuple[str, ...], to: str, actor: Actor) -> Deployment:
    with transaction.atomic(durable=True):
        locked = _locked(deployment)
        if locked.status not in from_:
            raise DeploymentRefused(f"the deployment is {locked.status}; it cannot become {to}")
        before = locked.status
        locked.status = to
        if to == DeploymentStatus.RUNNING:
            _skip_missed_ticks(locked)
        locked.save(update_fields=["status", "last_tick_at", "updated_at"])
        _audit(locked, actor, f"deployment.{to}", {"status": before}, {"status": to})
    return locked


def _skip_missed_ticks(deployment: Deployment) -> None:
    """A schedule resumed or deployed again starts from now: the ticks it was told not to
    fire (paused, stopped) are not caught up afterwards."""
    if deployment.source_kind == SourceKind.SCHEDULE:
        deployment.last_tick_at = timezone.now()


def _locked(deployment: Deployment) -> Deployment:
    return (
        Deployment.objects.select_for_update()
        .select_related("tenant", "run", "version")
        .get(pk=deployment.pk)
    )


def _audit(
    deployment: Deployment,
    actor: Actor,
    action: str,
    before: dict[str, Any] | None,
    after: dict[str, Any],
) -> None:
    record(
        tenant=current_tenant(),
        actor=actor,
        action=action,
        target_type="deployment",
        target_id=deployment.id,
        before=before,
        after=after,
    )


def replay_dead_letter(dead: DeadLetter, *, actor: Actor) -> DeadLetter:
    """Runs the dead letter's record through the version deployed now (fixed, say, to
    accept it) and takes it exactly once: the outcome and the mark are one transaction.
    If it fails again, nothing is taken and the letter keeps the new error."""
    with transaction.atomic(durable=True):
        locked = DeadLetter.objects.select_for_update().get(pk=dead.pk)
        if locked.replayed_at is not None:
            raise DeploymentRefused("this record was already replayed")
        deployment = _locked(locked.deployment)
        if deployment.status == DeploymentStatus.STOPPED:
            raise DeploymentRefused("the deployment is stopped: deploy a version, then replay")
        segment = Segment(deployment.version.spec, scope=deployment.id.hex[:12])
        if segment.stateful:
            raise DeploymentRefused(
                "this version has windows or memory, whose state lives with the record's"
                " partition: fix the record and produce it to the topic again instead"
            )
        origin = f"{locked.topic}:{locked.partition}:{locked.offset}" if locked.topic else ""
        try:
            record_ = _replayed_record(segment, locked, origin or f"dead-letter:{locked.pk}")
            outcome = segment.run(record_)
            produce([outcome])
        except (PermanentError, SegmentError, kafka.DeliveryFailed) as exc:
            locked.error = f"replay failed: {exc}"[:2000]
            locked.save(update_fields=["error"])
            return locked
        write_outcomes(deployment.run, segment, [outcome], [], deployment.id)
        locked.replayed_at = timezone.now()
        locked.save(update_fields=["replayed_at"])
        _audit(deployment, actor, "deployment.replay", {"dead_letter": locked.pk}, {"ok": True})
    return locked


def _replayed_record(segment: Segment, dead: DeadLetter, origin: str) -> Record:
    config = segment.source.get("config", {})
    payload, key, event_time = KafkaSource().decode(
        config,
        dead.key.encode() or None,
        dead.payload.encode(),
        int(dead.created_at.timestamp() * 1000),
    )
    return Record(origin, payload, key, event_time)
