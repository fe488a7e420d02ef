"""The one writer of step, run and fan-in rows (DBOS keeps its system tables behind
SystemDatabase the same way): claims, status transitions with their row-count checks, the
run's open-step count and how a run ends, fan-in counters, retries taken, leases renewed,
skips. Everything else in the engine decides; this module writes, inside the caller's
transaction, and announces each status change on the run's live feed once it commits.

A status changes only through a conditional UPDATE from the statuses the caller expects,
checked against the allowed transitions (states.py): a race (a cancel against the last
step's commit) shows as False; a transition the state machine forbids raises.

The hot path is hand-written SQL, one round trip per decision. The common claim and the
common commit (claim_at_once, commit_at_once) are one prepared statement each, in
autocommit: a step that feeds the next costs two statements, or one when the next is
written already leased to the same worker. So are the run's open-step count, locking a
worker's own step with its run's status, the retry budget, lease renewal and a stop's
skips. The general path (fan-outs opening and settling, failures, usage, sink rows) goes
through the ORM in one transaction per decision (bench overhead counts the statements
per step).
"""

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import psycopg
from django.db import connection, transaction
from django.db.backends.utils import CursorDebugWrapper, CursorWrapper
from django.db.models import F, Model, Q
from django.utils import timezone

from apps.audit.models import AuditEntry
from apps.live.publisher import FEED
from apps.runs.engine.rows import column_list, columns, from_json, from_row, rows_json
from apps.runs.engine.states import (
    DEADLINE,
    check_run_transition,
    check_step_transition,
)
from apps.runs.models import (
    ACTIVE_RUN_STATUSES,
    CLAIMABLE_STEP_STATUSES,
    Event,
    FanIn,
    FanInArrival,
    Run,
    RunStatus,
    Step,
    StepStatus,
)

# -- runs ---------------------------------------------------------------------------------


def create_run(**fields: Any) -> Run:
    return Run.objects.create(**fields)


def insert_run(run: Run) -> None:
    run.save(force_insert=True)


def transition_run(run: Run, *, from_: tuple[str, ...], to: str, **fields: Any) -> bool:
    check_run_transition(from_, to)
    moved = Run.objects.filter(id=run.id, status__in=from_).update(status=to, **fields) == 1
    if moved:
        _announce_run(run, to, fields.get("error", ""))
    return moved


def _announce_run(run: Run, status: str, error: str) -> None:
    frame = {"type": "run", "status": status, "error": error}
    tenant_id, run_id = run.tenant_id, run.id
    transaction.on_commit(lambda: FEED.frame(tenant_id, run_id, frame))


def run_status(run_id: UUID) -> tuple[str, datetime | None, datetime | None]:
    """(status, deadline, finished_at): what a running step checks between tokens."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT status, deadline, finished_at FROM runs_run WHERE id = %s", [run_id])
        status, deadline, finished_at = cursor.fetchone()
    return status, deadline, finished_at


def lock_run_status(run_id: UUID) -> str:
    """The run's status, with its row locked until the transaction ends."""
    return str(Run.objects.select_for_update().values_list("status", flat=True).get(id=run_id))


def move_open_steps(run: Run, delta: int, failures: int = 0) -> None:
    """Steps added to or taken from the run, and failures that reached it; the run finishes
    if that leaves none open."""
    if delta == 0 and failures == 0:
        return  # one step ended and one began: the count cannot have reached zero
    with connection.cursor() as cursor:
        # One round trip on the run's hot row: move the counts and read where they landed.
        cursor.execute(
            "UPDATE runs_run SET open_steps = open_steps + %s, failures = failures + %s"
            " WHERE id = %s AND tenant_id = %s RETURNING open_steps, status, failures",
            [delta, failures, run.id, run.tenant_id],
        )
        open_steps, status, run_failures = cursor.fetchone()
    if open_steps == 0 and status in (RunStatus.QUEUED, RunStatus.RUNNING):
        finish_run(run, from_status=status, failures=run_failures)


# A step that failed the run (or its fan-out): dead, or skipped past its deadline.
FAILED_STEP = Q(status=StepStatus.DEAD) | Q(status=StepStatus.SKIPPED, skip_reason=DEADLINE)


def finish_run(run: Run, *, from_status: str, failures: int) -> None:
    """The last open step settled. Failures a collect absorbed do not fail the run."""
    if not failures:
        transition_run(
            run, from_=(from_status,), to=RunStatus.SUCCEEDED, finished_at=timezone.now()
        )
        return
    failed = Step.objects.filter(FAILED_STEP, run_id=run.id)
    count = failed.count()
    named = [
        f"{node}: {error or reason}"
        for node, error, reason in failed.values_list("node_id", "error", "skip_reason")[:5]
    ]
    transition_run(
        run,
        from_=(from_status,),
        to=RunStatus.FAILED,
        error=f"{count} failed step{'' if count == 1 else 's'}: {'; '.join(named)}",
        finished_at=timezone.now(),
    )


def take_retry(run_id: UUID, tenant_id: int, ratio: float, minimum: int) -> bool:
    """Spends one retry from the run's budget; False when it is spent. The budget grows with
    the run: `ratio` of its steps plus `minimum`."""
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE runs_run SET retries = retries + 1"
            " WHERE id = %s AND tenant_id = %s AND retries <"
            " (SELECT count(*) FROM runs_step WHERE run_id = %s) * %s + %s"
            " RETURNING retries",
            [run_id, tenant_id, run_id, ratio, minimum],
        )
        return cursor.fetchone() is not None


def reopen_for_replay(run: Run, *, steps: int, failures_taken_back: int) -> None:
    Run.objects.filter(id=run.id).update(
        open_steps=F("open_steps") + steps,
        failures=F("failures") - failures_taken_back,
        retries=0,  # a fresh budget: the replay is a decision, not a retry storm
    )


# -- steps --------------------------------------------------------------------------------


# From this many rows on, new rows go by COPY: a fan-out's thousands of items.
COPY_FROM = 10


def create_steps(steps: Sequence[Step]) -> None:
    create_rows(steps)


def create_rows(objects: Sequence[Model]) -> None:
    """New rows of one model: by COPY when they are many, else one INSERT."""
    if len(objects) >= COPY_FROM:
        copy_new_rows(objects)
    elif objects:
        type(objects[0]).objects.bulk_create(objects)  # type: ignore[attr-defined]


def copy_new_rows(objects: Sequence[Model]) -> None:
    """Many new rows of one model with COPY instead of a multi-row INSERT.

    A bulk intake of 500 events writes 1,000 rows; as an INSERT that is one statement with
    some 16,000 parameters, which Django and psycopg spend more time building and binding
    than PostgreSQL spends storing it (bench/ingest). COPY streams the same rows. Only for
    plain new rows: every column is written as Django would on save (defaults and
    auto_now_add filled in by the fields themselves), no signals, no returned ids."""
    if not objects:
        return
    fields = type(objects[0])._meta.concrete_fields
    table = connection.ops.quote_name(type(objects[0])._meta.db_table)
    columns = ", ".join(connection.ops.quote_name(str(f.column)) for f in fields)
    with connection.cursor() as cursor, cursor.copy(f"COPY {table} ({columns}) FROM STDIN") as copy:
        for obj in objects:
            copy.write_row(
                [f.get_db_prep_save(f.pre_save(obj, add=True), connection) for f in fields]
            )


def transition_step(
    step: Step,
    *,
    from_: tuple[str, ...],
    to: str,
    holding_lease: UUID | None = None,
    **fields: Any,
) -> bool:
    """With holding_lease, only the worker holding that lease token can make the change."""
    check_step_transition(from_, to)
    rows = Step.objects.filter(id=step.id, status__in=from_)
    if holding_lease is not None:
        rows = rows.filter(lease_token=holding_lease)
    moved = rows.update(status=to, **fields) == 1
    if moved:
        announce_step(step, to, fields)
    return moved


def announce_step(step: Step, to: str, fields: dict[str, Any]) -> None:
    frame: dict[str, Any] = {
        "type": "step",
        "step": str(step.id),
        "node": step.node_id,
        "item": step.item_index,
        "status": to,
        "attempt": fields.get("attempt", step.attempt),
    }
    if fields.get("error"):
        frame["error"] = fields["error"]
    if fields.get("skip_reason"):
        frame["skip_reason"] = fields["skip_reason"]
    tenant_id, run_id = step.tenant_id, step.run_id
    transaction.on_commit(lambda: FEED.frame(tenant_id, run_id, frame))


def lock_claimable_step(step_id: UUID) -> Step | None:
    """The step, locked, if it waits to be claimed and nobody else is claiming it right now
    (SKIP LOCKED: leave it to them)."""
    return (
        Step.objects.select_for_update(skip_locked=True)
        .filter(id=step_id, status__in=CLAIMABLE_STEP_STATUSES)
        .first()
    )


def lock_expired_step(step_id: UUID, now: datetime) -> Step | None:
    return (
        Step.objects.select_for_update(skip_locked=True)
        .filter(id=step_id, status=StepStatus.RUNNING, lease_until__lt=now)
        .first()
    )


def lock_dead_steps(run_id: UUID, step_ids: list[UUID] | None) -> list[Step]:
    dead = Step.objects.select_for_update().filter(run_id=run_id, status=StepStatus.DEAD)
    if step_ids is not None:
        dead = dead.filter(id__in=step_ids)
    return list(dead.order_by("created_at", "id"))


def lock_own_step(step_id: UUID) -> tuple[str, UUID | None, str]:
    """Locks a step its worker is about to end: (its status, its lease token, its run's
    status), in one query."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT s.status, s.lease_token, r.status FROM runs_step s"
            " JOIN runs_run r ON r.id = s.run_id WHERE s.id = %s FOR UPDATE OF s",
            [step_id],
        )
        status, token, run_status = cursor.fetchone()
    return status, token, run_status


def skip_waiting(run: Run, reason: str) -> int:
    """Skips the run's queued and retry-waiting steps and takes them off its open count.
    A step locked by a worker mid-claim is passed over; that worker sees the stopped run
    and skips it itself."""
    check_step_transition((StepStatus.QUEUED, StepStatus.FAILED), StepStatus.SKIPPED)
    with connection.cursor() as cursor:
        cursor.execute(
            "WITH waiting AS (SELECT id FROM runs_step WHERE run_id = %s"
            "   AND status IN ('queued', 'failed') FOR UPDATE SKIP LOCKED),"
            " skipped AS (UPDATE runs_step s SET status = 'skipped', skip_reason = %s,"
            "   finished_at = now() FROM waiting WHERE s.id = waiting.id RETURNING s.id)"
            " UPDATE runs_run SET open_steps = open_steps - (SELECT count(*) FROM skipped)"
            " WHERE id = %s RETURNING (SELECT count(*) FROM skipped)",
            [run.id, reason, run.id],
        )
        row = cursor.fetchone()
    return int(row[0]) if row else 0


def mark_resent(step_ids: list[UUID], now: datetime) -> None:
    """Queued steps that were sent a new message: not lost again for another while."""
    Step.unscoped_all_tenants.filter(id__in=step_ids).update(enqueued_at=now)


def renew_leases(held: dict[UUID, UUID], until: datetime) -> set[UUID]:
    """Extends the leases this worker holds; returns the steps still leased to it.
    Infrastructure, not tenant data: rows are matched by id and this worker's lease token,
    which only this process knows."""
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE runs_step SET lease_until = %s"
            " WHERE status = 'running' AND (id, lease_token) IN"
            " (SELECT * FROM unnest(%s::uuid[], %s::uuid[])) RETURNING id",
            [until, list(held), list(held.values())],
        )
        return {row[0] for row in cursor.fetchall()}


# -- the hot path: a claim and a commit in one statement each ----------------------------
#
# The common claim (a queued step of an active run, nothing overdue) and the common commit
# (a step leased to this worker, of an active run, that settles no fan-out) are single
# statements in autocommit: one round trip each instead of a transaction of five or six.
# Each reports when its case does not hold, having written nothing; the engine then takes
# the general path, which sorts out why (and is one transaction too).


class _PreparedCursor(psycopg.Cursor[Any]):
    """Binds parameters on the server and prepares the statement on its first run in this
    connection: the hot statements are long CTEs whose planning costs about as much as
    their execution. (Django's cursors bind on the client and never prepare.)"""

    def execute(self, query: Any, params: Any = None, **kwargs: Any) -> Any:
        return super().execute(query, params, prepare=True)


def _hot_cursor() -> CursorWrapper:
    """A prepared-statement cursor on Django's own connection (its transaction, its
    execute wrappers, its query log)."""
    connection.ensure_connection()
    raw = connection.connection
    if raw.prepare_threshold is None:
        # Django turns preparing off (None); a threshold no statement reaches turns it back
        # on for explicit prepares only, and Django's client-binding cursors never prepare.
        raw.prepare_threshold = 2**31 - 1
    cursor = _PreparedCursor(raw)
    if connection.queries_logged:  # DEBUG, or a test capturing queries
        return CursorDebugWrapper(cursor, connection)
    return CursorWrapper(cursor, connection)


_STEP_COLUMNS = columns(Step)
_RUN_COLUMNS = columns(Run, leave_out=("input",))  # a run's input can be large; steps never read it
_EVENT_COLUMNS = columns(Event)

_CLAIM = (
    "WITH target AS (SELECT s.id, s.run_id FROM runs_step s"
    "   JOIN runs_run r ON r.id = s.run_id AND r.tenant_id = s.tenant_id"
    "  WHERE s.id = %(step)s AND s.tenant_id = %(tenant)s"
    "    AND s.status IN ('queued', 'failed')"
    "    AND (s.not_before IS NULL OR s.not_before <= %(now)s)"
    "    AND (s.deadline IS NULL OR s.deadline > %(now)s)"
    "    AND r.status IN ('queued', 'running')"
    "    AND (r.deadline IS NULL OR r.deadline > %(now)s)"
    "  FOR UPDATE OF s SKIP LOCKED),"
    " started AS (UPDATE runs_run SET status = 'running', started_at = %(now)s"
    "  WHERE id = (SELECT run_id FROM target) AND tenant_id = %(tenant)s"
    "    AND status = 'queued' RETURNING id),"
    " claimed AS (UPDATE runs_step s SET status = 'running', attempt = s.attempt + 1,"
    "    lease_until = %(until)s, lease_token = %(token)s, worker = %(worker)s,"
    "    started_at = %(now)s, not_before = NULL, waiting = ''"
    "  FROM target WHERE s.id = target.id"
    f"  RETURNING {column_list(_STEP_COLUMNS, 's')})"
    f" SELECT claimed.*, {column_list(_RUN_COLUMNS, 'r')},"
    "   EXISTS (SELECT FROM started),"
    # The step's input events come along: the operator reads them next.
    "   (SELECT jsonb_agg(e) FROM runs_event e"
    "     WHERE e.id = ANY (claimed.inputs) AND e.tenant_id = %(tenant)s)"
    " FROM claimed JOIN runs_run r ON r.id = claimed.run_id"
)


def claim_at_once(
    step_id: UUID, tenant_id: int, *, token: UUID, worker: str, now: datetime, until: datetime
) -> tuple[Step, Run, list[Event]] | None:
    """Leases a claimable step of an active run to this worker, and moves a queued run to
    running; the step and run as they now are, and the step's input events. None, with
    nothing written, when the step is not claimable right now (done, leased, locked by
    another claimer, not yet due) or its run or its deadline ended: claim_step's general
    path sorts those out."""
    check_step_transition(CLAIMABLE_STEP_STATUSES, StepStatus.RUNNING)
    check_run_transition((RunStatus.QUEUED,), RunStatus.RUNNING)
    params: dict[str, Any] = {
        "step": step_id,
        "tenant": tenant_id,
        "now": now,
        "until": until,
        "token": token,
        "worker": worker,
    }
    with _hot_cursor() as cursor:
        cursor.execute(_CLAIM, params)
        row = cursor.fetchone()
    if row is None:
        return None
    split = len(_STEP_COLUMNS)
    step = from_row(Step, _STEP_COLUMNS, row[:split])
    run = from_row(Run, _RUN_COLUMNS, row[split:-2])
    started, events = row[-2], from_json(Event, _EVENT_COLUMNS, row[-1])
    if started:  # the join read the run as it was before this statement
        run.status, run.started_at = RunStatus.RUNNING, now
        _announce_run(run, RunStatus.RUNNING, "")
    announce_step(step, StepStatus.RUNNING, {})
    return step, run, events


_COMMIT = (
    "WITH own AS (SELECT s.id FROM runs_step s"
    "   JOIN runs_run r ON r.id = s.run_id AND r.tenant_id = s.tenant_id"
    "  WHERE s.id = %(step)s AND s.tenant_id = %(tenant)s AND s.status = 'running'"
    "    AND s.lease_token = %(token)s AND r.status IN ('queued', 'running')"
    "  FOR UPDATE OF s),"
    " fanin AS (SELECT fanout_step_id AS id FROM runs_fanin"
    "  WHERE fanout_step_id = %(scope)s AND tenant_id = %(tenant)s AND closed = ''"
    "    AND pending + %(pending_delta)s > 0 AND EXISTS (SELECT FROM own)"
    "  FOR UPDATE),"
    # A row locked after a concurrent change is re-checked as it now is.
    " counted_run AS (SELECT id FROM runs_run"
    "  WHERE id = %(run)s AND tenant_id = %(tenant)s AND %(delta)s <> 0"
    "    AND status IN ('queued', 'running')"
    "    AND (failures = 0 OR open_steps + %(delta)s > 0)"
    "    AND EXISTS (SELECT FROM own)"
    "    AND (%(scope)s::uuid IS NULL OR EXISTS (SELECT FROM fanin))"
    "  FOR UPDATE),"
    " go AS (SELECT FROM own"
    "  WHERE (%(scope)s::uuid IS NULL OR EXISTS (SELECT FROM fanin))"
    "    AND (%(delta)s = 0 OR EXISTS (SELECT FROM counted_run))),"
    " moved_fanin AS (UPDATE runs_fanin SET pending = pending + %(pending_delta)s"
    "  WHERE fanout_step_id = (SELECT id FROM fanin) AND EXISTS (SELECT FROM go)),"
    " arrivals AS (INSERT INTO runs_faninarrival (tenant_id, fanin_id, event_id)"
    "  SELECT %(tenant)s, fanin.id, arrived FROM fanin,"
    "    unnest(%(arrived)s::uuid[]) AS arrived WHERE EXISTS (SELECT FROM go)),"
    " moved_run AS (UPDATE runs_run SET open_steps = open_steps + %(delta)s,"
    "    status = CASE WHEN open_steps + %(delta)s = 0 THEN 'succeeded' ELSE status END,"
    "    finished_at = CASE WHEN open_steps + %(delta)s = 0 THEN %(now)s"
    "      ELSE finished_at END"
    "  WHERE id = (SELECT id FROM counted_run) AND EXISTS (SELECT FROM go)"
    "  RETURNING status),"
    " done AS (UPDATE runs_step SET status = 'done', lease_until = NULL,"
    "    finished_at = %(now)s, duration_ms = %(duration_ms)s,"
    "    operator_ms = %(operator_ms)s"
    "  WHERE id = (SELECT id FROM own) AND EXISTS (SELECT FROM go)),"
    " new_events AS (INSERT INTO runs_event SELECT * FROM"
    "   jsonb_populate_recordset(NULL::runs_event, %(events)s::jsonb)"
    "  WHERE EXISTS (SELECT FROM go)),"
    " new_steps AS (INSERT INTO runs_step SELECT * FROM"
    "   jsonb_populate_recordset(NULL::runs_step, %(steps)s::jsonb)"
    "  WHERE EXISTS (SELECT FROM go))"
    " SELECT EXISTS (SELECT FROM go), (SELECT status FROM moved_run)"
)


_AUDIT_COLUMNS = ", ".join(
    connection.ops.quote_name(str(f.column)) for f in columns(AuditEntry, leave_out=("id",))
)
_START = (
    "WITH free AS (SELECT FROM tenants_tenant WHERE id = %(tenant)s"
    "    AND max_active_runs IS NULL AND max_run_budget_usd IS NULL),"
    " new_run AS (INSERT INTO runs_run SELECT * FROM"
    "   jsonb_populate_recordset(NULL::runs_run, %(run)s::jsonb) WHERE EXISTS (SELECT FROM free)),"
    " new_events AS (INSERT INTO runs_event SELECT * FROM"
    "   jsonb_populate_recordset(NULL::runs_event, %(events)s::jsonb)"
    "  WHERE EXISTS (SELECT FROM free)),"
    " new_steps AS (INSERT INTO runs_step SELECT * FROM"
    "   jsonb_populate_recordset(NULL::runs_step, %(steps)s::jsonb)"
    "  WHERE EXISTS (SELECT FROM free)),"
    f" audited AS (INSERT INTO audit_auditentry ({_AUDIT_COLUMNS}) SELECT {_AUDIT_COLUMNS}"
    "   FROM jsonb_populate_recordset(NULL::audit_auditentry, %(audit)s::jsonb)"
    "  WHERE EXISTS (SELECT FROM free))"
    " SELECT EXISTS (SELECT FROM free)"
)


def start_run_at_once(
    run: Run, events: Sequence[Event], steps: Sequence[Step], entry: AuditEntry
) -> bool:
    """Writes a new run (its open_steps already counting `steps`), its input events, its
    source steps and the audit entry of its start in one statement. False, with nothing
    written, when the tenant has run quotas: those are checked, with the tenant's row
    locked, in the general path's transaction."""
    with _hot_cursor() as cursor:
        cursor.execute(
            _START,
            {
                "tenant": run.tenant_id,
                "run": rows_json([run]),
                "events": rows_json(list(events)),
                "steps": rows_json(list(steps)),
                "audit": rows_json([entry], leave_out=("id",)),
            },
        )
        (written,) = cursor.fetchone()
    return bool(written)


@dataclass(frozen=True)
class ScopeMove:
    """What a commit does to one fan-out scope: its pending count moves by `pending_delta`
    and `arrived` events reach its collect."""

    scope: UUID
    pending_delta: int
    arrived: list[UUID]


def commit_at_once(
    step: Step,
    token: UUID,
    run: Run,
    *,
    done: dict[str, Any],
    events: Sequence[Model],
    new_steps: Sequence[Step],
    open_delta: int,
    scope_move: ScopeMove | None = None,
) -> bool:
    """Ends a running step this worker holds as done with `done`'s fields, writes its
    events and the steps they feed, moves one fan-out scope's pending count (with its
    arrivals) and the run's open-step count, succeeding the run when that reaches zero.

    False, with nothing written, when the lease is lost, the run is no longer active, the
    scope would settle (its collect fires: settle.py's work), or the run's count would
    reach zero with failures to name: the general path handles those. `run.status` is
    updated.

    Every row the statement changes is locked first, in the engine's lock order (the step,
    the fan-in, the run), by CTEs that also check the conditions; the writes depend on all
    the checks, so the statement writes everything or nothing."""
    check_step_transition((StepStatus.RUNNING,), StepStatus.DONE)
    check_run_transition(tuple(ACTIVE_RUN_STATUSES), RunStatus.SUCCEEDED)
    with _hot_cursor() as cursor:
        cursor.execute(
            _COMMIT,
            {
                "step": step.id,
                "tenant": run.tenant_id,
                "token": token,
                "run": run.id,
                "delta": open_delta,
                "scope": scope_move.scope if scope_move else None,
                "pending_delta": scope_move.pending_delta if scope_move else 0,
                "arrived": scope_move.arrived if scope_move else [],
                "now": done["finished_at"],
                "duration_ms": done["duration_ms"],
                "operator_ms": done["operator_ms"],
                "events": rows_json(list(events)),
                "steps": rows_json(list(new_steps)),
            },
        )
        applied, run_status = cursor.fetchone()
    if not applied:
        return False
    announce_step(step, StepStatus.DONE, {})
    if run_status == RunStatus.SUCCEEDED:
        run.status = RunStatus.SUCCEEDED
        _announce_run(run, RunStatus.SUCCEEDED, "")
    return True


# -- fan-ins ------------------------------------------------------------------------------


def create_fanin(**fields: Any) -> FanIn:
    return FanIn.objects.create(**fields)


def lock_fanin(scope_id: UUID) -> FanIn:
    return FanIn.objects.select_for_update().get(fanout_step_id=scope_id)


def save_fanin(fanin: FanIn, *fields: str) -> None:
    fanin.save(update_fields=list(fields))


def add_arrivals(fanin: FanIn, event_ids: list[UUID]) -> None:
    FanInArrival.objects.bulk_create(
        FanInArrival(tenant_id=fanin.tenant_id, fanin=fanin, event_id=event_id)
        for event_id in event_ids
    )
