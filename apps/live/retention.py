"""Feed retention: a finished run keeps its archived frames (RunFrame) for its tenant's
`feed_retention_days`; then the sweeper deletes them, and the run's feed becomes one summary
frame (apps/live/summary.py) numbered like its last frame.

A run is pruned in two steps, each safe to repeat: PrunedFeed is written first (from then
on readers ignore whatever frames are left), then the frames are deleted a batch per
DELETE statement. A pass deletes at most `max_batches` batches, so a sweep stays short; a
run cut off in the middle is taken up again by the next pass.

Finding the work must stay cheap on tables of millions of runs and frames. Each tenant's
PruneCursor marks how far its finished runs have been walked, oldest first, along the
index run_tenant_finished: a pass reads only the runs that finished since the cursor and
are past the retention, so with nothing to do it costs one index probe per tenant. Frames
are never read into Python: a run's last seq is one probe of the (run, seq) index."""

from dataclasses import dataclass
from datetime import datetime, timedelta
from uuid import UUID

from django.db import connection
from django.db.models import Max
from django.utils import timezone

from apps.live import feed
from apps.live.models import PruneCursor, PrunedFeed, RunFrame
from apps.runs.models import ACTIVE_RUN_STATUSES, Run
from apps.tenants.models import Tenant

BATCH = 5000
MAX_BATCHES = 20
# Runs one pass walks per tenant. A run without frames costs a probe; a backlog (the first
# pass over years of runs) spreads over several sweeps.
RUNS_PER_TENANT = 500
# After a pass that left nothing to do, the next waits this long. Retention counts days, so
# a minute late costs nothing, and the sweeper (every second) skips a probe per tenant.
IDLE_S = 60
# Held while a pass runs and for IDLE_S after one that finished its work: one pass at a
# time across the workers that run the sweeper.
PASS_KEY = "sluice:feed:prune-pass"


@dataclass
class Pass:
    now: datetime
    batch: int
    batches_left: int
    deleted: int = 0
    # False when a bound (batches, runs per tenant) stopped the pass with work left.
    complete: bool = True


def prune_when_due() -> int:
    """The sweeper's entry: a pass when none ran in the last IDLE_S or the last one had to
    stop early; returns frames deleted. A pass that fails leaves the key to expire, so an
    error is retried after IDLE_S, not every second."""
    client = feed.feed_redis()
    if not client.set(PASS_KEY, "1", nx=True, ex=IDLE_S):
        return 0
    work = _prune(timezone.now(), BATCH, MAX_BATCHES)
    if not work.complete:
        client.delete(PASS_KEY)  # more to do: the next sweep goes on with it
    return work.deleted


def prune_expired_frames(
    now: datetime | None = None, batch: int = BATCH, max_batches: int = MAX_BATCHES
) -> int:
    """One pass over every tenant; returns how many frames it deleted."""
    return _prune(now or timezone.now(), batch, max_batches).deleted


def _prune(now: datetime, batch: int, max_batches: int) -> Pass:
    work = Pass(now, batch, max_batches)
    cursors = {cursor.tenant_id: cursor for cursor in PruneCursor.unscoped_all_tenants.all()}
    for tenant in Tenant.objects.order_by("id").only("id", "feed_retention_days"):
        _prune_tenant(tenant, cursors.get(tenant.id), work)
    return work


def _prune_tenant(tenant: Tenant, cursor: PruneCursor | None, work: Pass) -> None:
    cutoff = work.now - timedelta(days=tenant.feed_retention_days)
    runs = Run.unscoped_all_tenants.filter(
        tenant_id=tenant.id, finished_at__isnull=False, finished_at__lt=cutoff
    ).exclude(status__in=ACTIVE_RUN_STATUSES)
    if cursor is not None:
        # `>=` bounds the index scan; the exclude drops the runs at the cursor's own instant
        # that it has passed already.
        runs = runs.filter(finished_at__gte=cursor.finished_at).exclude(
            finished_at=cursor.finished_at, id__lte=cursor.run_id
        )
    walk = runs.order_by("finished_at", "id").values_list("id", "finished_at")
    due = list(walk[:RUNS_PER_TENANT])
    walked: tuple[UUID, datetime] | None = None
    for run_id, finished_at in due:
        if not _prune_run(tenant.id, run_id, finished_at, work):
            work.complete = False
            break
        walked = (run_id, finished_at)
    else:
        if len(due) == RUNS_PER_TENANT:
            work.complete = False
    if walked is not None:
        PruneCursor.unscoped_all_tenants.update_or_create(
            tenant_id=tenant.id, defaults={"run_id": walked[0], "finished_at": walked[1]}
        )


def _prune_run(tenant_id: int, run_id: UUID, finished_at: datetime, work: Pass) -> bool:
    """Marks the run pruned and deletes its frames as far as the pass's batches go; True
    when none is left."""
    last_seq = RunFrame.unscoped_all_tenants.filter(run_id=run_id).aggregate(last=Max("seq"))[
        "last"
    ]
    if last_seq is None:
        return True  # no frames: never had any, or pruned already
    if work.batches_left <= 0:
        return False
    _mark_pruned(tenant_id, run_id, last_seq, finished_at, work.now)
    while work.batches_left > 0:
        work.batches_left -= 1
        deleted = _delete_batch(run_id, work.batch)
        work.deleted += deleted
        if deleted < work.batch:
            return True
    return False


def _mark_pruned(
    tenant_id: int, run_id: UUID, last_seq: int, finished_at: datetime, now: datetime
) -> None:
    pruned, created = PrunedFeed.unscoped_all_tenants.get_or_create(
        run_id=run_id, defaults={"tenant_id": tenant_id, "last_seq": last_seq, "pruned_at": now}
    )
    if created or (finished_at <= pruned.pruned_at and last_seq <= pruned.last_seq):
        return  # a pass taken up again, some of the frames deleted already
    # The run was replayed since it was pruned, and finished again: these frames are its
    # second life's, and its summary comes after them.
    PrunedFeed.unscoped_all_tenants.filter(pk=pruned.pk).update(
        last_seq=max(last_seq, pruned.last_seq), pruned_at=now
    )


def _delete_batch(run_id: UUID, batch: int) -> int:
    """Deletes up to `batch` of the run's frames in one statement, found through the
    (run, seq) index; returns how many."""
    table = connection.ops.quote_name(RunFrame._meta.db_table)
    with connection.cursor() as cursor:
        cursor.execute(
            f"DELETE FROM {table} WHERE id IN (SELECT id FROM {table} WHERE run_id = %s LIMIT %s)",
            [run_id, batch],
        )
        return int(cursor.rowcount)
