"""Schedule deployments: one record per tick of the source's cron expression (UTC), each
tick taken exactly once.

Beat sends `sluice.fire_schedules` every SLUICE_SCHEDULE_POLL_S; it fires, for every running
schedule deployment, the ticks that fell due since the last one fired (or since the
deployment was made), the SLUICE_SCHEDULE_CATCH_UP most recent at most: a deployment that
missed a day of minutely ticks (beat was down) catches up on a few, not 1440.

A tick is one transaction: its ScheduleTick row (unique per deployment and time, inserted
with ON CONFLICT DO NOTHING), the record's events, rows, steps and Kafka records, and the
deployment's `last_tick_at`. Only the call whose insert made the row runs the segment, so two
beats, or a beat restarted across a tick, fire each tick once. A tick a node fails on
becomes a dead letter and counts as fired; the next tick fires as usual.
"""

import json
import logging
from datetime import UTC, datetime, timedelta

from croniter import CroniterError, croniter
from django.conf import settings
from django.db import connection, transaction
from django.db.models import Value
from django.db.models.functions import Greatest

from apps.graphs.validation import source_node
from apps.streams.checkpoint import DeadRecord, produce, write_outcomes
from apps.streams.models import Deployment, DeploymentStatus, ScheduleTick, SourceKind
from apps.streams.segment import Record, Segment, SegmentError
from apps.tenants.context import tenant_context
from workers import kafka
from workers.operators.base import PermanentError

logger = logging.getLogger(__name__)

# The task (sluice/tasks.py) beat sends; by name.
FIRE_SCHEDULES = "sluice.fire_schedules"


def catch_up_limit() -> int:
    return settings.SLUICE_SCHEDULE_CATCH_UP


def fire_due_ticks(now: datetime) -> int:
    """Fires every running schedule deployment's due ticks; returns how many this call fired
    (a tick another caller fired first does not count)."""
    deployments = Deployment.unscoped_all_tenants.select_related("tenant", "version").filter(
        source_kind=SourceKind.SCHEDULE, status=DeploymentStatus.RUNNING
    )
    fired = 0
    for deployment in deployments:
        with tenant_context(deployment.tenant):
            fired += _fire_deployment(deployment, now)
    return fired


def due_ticks(cron: str, since: datetime, now: datetime, limit: int) -> list[datetime]:
    """The ticks in (since, now], oldest first: the `limit` most recent of them."""
    # croniter's get_prev is strictly before its start: a microsecond on, a tick at `now`
    # itself counts. Walking back from now bounds the work by `limit`, however long ago
    # `since` was.
    ticks = croniter(cron, now.astimezone(UTC) + timedelta(microseconds=1))
    found: list[datetime] = []
    while len(found) < limit:
        tick = ticks.get_prev(datetime)
        if tick <= since:
            break
        found.append(tick)
    return found[::-1]


def _fire_deployment(deployment: Deployment, now: datetime) -> int:
    config = source_node(deployment.version.spec).get("config", {})
    since = deployment.last_tick_at or deployment.created_at
    try:
        ticks = due_ticks(config["cron"], since, now, catch_up_limit())
    except (CroniterError, KeyError, ValueError) as exc:  # validated on save; never expected
        logger.error("schedule deployment %s: cannot read its cron: %s", deployment.pk, exc)
        return 0
    fired = 0
    for tick in ticks:
        try:
            fired += _fire_tick(deployment, tick)
        except (kafka.DeliveryFailed, kafka.KafkaUnavailable) as exc:
            # Nothing of this tick was written: the next poll tries it again, and the ticks
            # after it wait, so last_tick_at never passes a tick that did not fire.
            logger.warning(
                "schedule deployment %s: tick %s not fired, Kafka sink failed: %s",
                deployment.pk,
                tick.isoformat(),
                exc,
            )
            break
    return fired


def _fire_tick(deployment: Deployment, tick: datetime) -> int:
    """1 when this call fired the tick, 0 when it had fired already or the deployment is no
    longer running."""
    with transaction.atomic(durable=True):
        # Locked for the tick: a pause or a redeploy waits, and so does another beat firing
        # the same deployment (it then finds the tick's row and does nothing).
        current = (
            Deployment.objects.select_for_update(no_key=True)
            .select_related("version", "run")
            .filter(pk=deployment.pk, status=DeploymentStatus.RUNNING)
            .first()
        )
        if current is None or not _insert_tick(current, tick):
            return 0
        segment = Segment(current.version.spec, scope=current.id.hex[:12])
        config = segment.source.get("config", {})
        payload = {**config.get("payload", {}), "tick": tick.isoformat()}
        record = Record(f"schedule:{tick.isoformat()}", payload, "", tick)
        try:
            outcome = segment.run(record)
        except (PermanentError, SegmentError) as exc:
            dead = DeadRecord(error=str(exc), payload=json.dumps(payload))
            write_outcomes(current.run, segment, [], [dead], current.id)
        else:
            if outcome.produce:  # only a graph with a Kafka sink needs the broker
                produce([outcome])
            write_outcomes(current.run, segment, [outcome], [], current.id)
        Deployment.objects.filter(pk=current.pk).update(
            last_tick_at=Greatest("last_tick_at", Value(tick))
        )
    return 1


def _insert_tick(deployment: Deployment, tick: datetime) -> bool:
    """True when this call made the tick's row (in the caller's transaction)."""
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {ScheduleTick._meta.db_table} (tenant_id, deployment_id, tick_at,"
            " fired_at) VALUES (%s, %s, %s, now())"
            " ON CONFLICT (deployment_id, tick_at) DO NOTHING RETURNING id",
            [deployment.tenant_id, deployment.pk, tick],
        )
        return cursor.fetchone() is not None
