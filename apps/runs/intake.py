"""Many inputs at once: the items of a batch run, and the events of a stream deployment.

Both write, in one transaction, one input event and one source step per item, and move the
run's open-step count by as many. A stream run of the deployed version stays open between
events because it holds one open step of its own (the "hold"); deploying another version and
sending it an event releases the old run's hold, so that run finishes once its last steps
settle. Every payload is checked against the source's input schema before anything is
written: a bad item refuses the whole request and names its index."""

from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, NamedTuple

from django.db import transaction
from django.utils import timezone

from apps.audit.services import Actor
from apps.graphs.models import GraphVersion
from apps.graphs.validation import source_node
from apps.live.publisher import FEED
from apps.runs import engine
from apps.runs.engine import store
from apps.runs.models import ACTIVE_RUN_STATUSES, Event, Run, RunKind
from apps.runs.services import InvalidInput, check_input, check_run_quotas, record_start


class Item(NamedTuple):
    payload: Any
    key: str = ""
    event_time: datetime | None = None


def check_items(version: GraphVersion, items: list[Item], *, field: str) -> None:
    for index, item in enumerate(items):
        try:
            check_input(version, item.payload)
        except InvalidInput as error:
            raise InvalidInput(f"{field}.{index}.{error}") from None


def start_batch(
    *,
    version: GraphVersion,
    items: list[Item],
    actor: Actor,
    budget_usd: Decimal | None,
    deadline_s: float | None,
) -> Run:
    """A batch run with one source step per item. No run deadline unless asked for: a batch
    queues behind itself, and the graph's ttl_s is meant for one interactive run."""
    check_items(version, items, field="inputs")
    policies = version.spec.get("policies", {})
    now = timezone.now()
    with transaction.atomic():
        check_run_quotas(
            version.tenant_id, {**policies, "budget_usd": budget_usd} if budget_usd else policies
        )
        run = store.create_run(
            graph_version=version,
            kind=RunKind.BATCH,
            input={"items": len(items)},
            deadline=now + timedelta(seconds=deadline_s) if deadline_s else None,
            budget_usd=budget_usd,
            on_disconnect="detach",
            created_by=actor if getattr(actor, "is_authenticated", False) else None,
        )
        _add_items(run, version, items, now)
        record_start(run, version, actor, items=len(items))
        transaction.on_commit(lambda: FEED.run_started(run.id))
    return run


def ingest(*, version: GraphVersion, items: list[Item], actor: Actor) -> tuple[Run, list[Event]]:
    """Appends events to the version's stream run (opening it if need be)."""
    check_items(version, items, field="events")
    now = timezone.now()
    with transaction.atomic():
        run = _open_stream_run(version, actor)
        events = _add_items(run, version, items, now)
    return run, events


def _add_items(run: Run, version: GraphVersion, items: list[Item], now: datetime) -> list[Event]:
    source = source_node(version.spec)
    events = [
        Event(
            tenant_id=run.tenant_id,
            run=run,
            node_id="input",
            port="out",
            key=item.key,
            payload=item.payload,
            event_time=item.event_time or now,
            seq=index,
        )
        for index, item in enumerate(items)
    ]
    store.copy_new_rows(events)
    engine.enqueue(run, source, events)
    return events


def _open_stream_run(version: GraphVersion, actor: Actor) -> Run:
    active = Run.objects.filter(
        graph_version=version, kind=RunKind.STREAM, status__in=ACTIVE_RUN_STATUSES
    )
    run = active.order_by("created_at").first()
    if run is not None:
        return run
    # The first event of this version: lock the version so that two first events do not
    # open two stream runs, and look again under the lock.
    GraphVersion.objects.select_for_update().filter(pk=version.pk).first()
    run = active.order_by("created_at").first()
    if run is not None:
        return run
    check_run_quotas(version.tenant_id, {})
    run = store.create_run(
        graph_version=version,
        kind=RunKind.STREAM,
        input={},
        on_disconnect="detach",
        open_steps=1,  # the hold: the run stays open while its version takes events
        created_by=actor if getattr(actor, "is_authenticated", False) else None,
    )
    record_start(run, version, actor)
    _release_older_streams(version)
    transaction.on_commit(lambda: FEED.run_started(run.id))
    return run


def _release_older_streams(version: GraphVersion) -> None:
    """Other versions' stream runs of this graph take no more events: each gives up its
    hold and finishes when its last steps settle."""
    older = Run.objects.filter(
        graph_version__graph_id=version.graph_id,
        kind=RunKind.STREAM,
        status__in=ACTIVE_RUN_STATUSES,
    ).exclude(graph_version=version)
    for run in older.select_for_update():
        engine.release_hold(run)
