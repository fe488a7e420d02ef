"""The micro-batch's transaction: the checkpoint of a stream deployment.

One transaction writes what a batch of records produced (their events, the rows of their
table sinks, the steps of the first expensive nodes, their dead letters, the windows that
fired, the partition's window and memory state with its watermark) and moves each
partition's next offset from the one the batch was read at to the one after its last
record. The move is a compare and set, and the deployment's row is read under a share lock:
a batch read at an offset someone else has moved on from (a worker that lost the partition
in a rebalance, a copy replayed after a crash), or processed with a version that is no
longer deployed, or arriving after a pause, writes nothing and is read again from the
offset PostgreSQL holds. So every record is taken exactly once, by exactly one version.
"""

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID, uuid4

from django.db import connection, transaction
from django.utils import timezone

from apps.runs.engine import store
from apps.runs.engine.outbox import StepMessage, hand_off_on_commit
from apps.runs.engine.settle import new_step
from apps.runs.models import ResultRow, Run, Step
from apps.streams import state as partition_state
from apps.streams.models import DeadLetter, DeploymentStatus
from apps.streams.segment import FiredError, Record, RecordOutcome, Segment
from apps.streams.state import PartitionState
from workers import kafka
from workers.operators.base import JSON

# A batch may commit while its deployment is in one of these.
CONSUMING = (DeploymentStatus.RUNNING, DeploymentStatus.DRAINING)


class Fenced(Exception):
    """The batch was refused: nothing was written; read again from PostgreSQL's offsets."""


@dataclass(frozen=True)
class Binding:
    """What a worker processes a deployment's records with: one version and its run."""

    deployment_id: UUID
    tenant_id: int
    version_id: int
    run: Run


@dataclass(frozen=True)
class DeadRecord:
    error: str
    payload: str
    key: str = ""
    topic: str = ""
    partition: int | None = None
    offset: int | None = None


@dataclass
class PartitionBatch:
    topic: str
    partition: int
    read_at: int  # the next offset PostgreSQL held when these records were read
    next_offset: int  # one past the batch's last record
    high_watermark: int
    outcomes: list[RecordOutcome] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)  # of the outcomes, in order
    dead: list[DeadRecord] = field(default_factory=list)
    rate: float = 0.0
    # With stateful nodes: the partition's state after these records (its changes are
    # written with the offset), and the results of the windows that fired.
    state: PartitionState | None = None
    fired: list[RecordOutcome] = field(default_factory=list)
    # Relayed records taken in this batch (offset -> outbox row id): their rows go in the
    # same transaction.
    relayed: dict[int, int] = field(default_factory=dict)


def commit_batch(
    binding: Binding,
    segment: Segment,
    batches: Sequence[PartitionBatch],
    *,
    before_commit: Callable[[], None] = lambda: None,
) -> int:
    """Writes the batches and moves their offsets in one transaction; returns the steps
    created. Raises Fenced, having written nothing, when the batch must be read again.

    `before_commit` runs last inside the transaction: the Kafka worker waits there for the
    broker to acknowledge the batch's sink records, which it sent before, so the wait
    overlaps the writes; if it raises, nothing commits."""
    with transaction.atomic(durable=True):
        _check_binding(binding)
        for batch in batches:
            _move_offset(binding, batch)
            if batch.state is not None:
                partition_state.write(binding.deployment_id, binding.tenant_id, batch.state)
            if batch.relayed:
                _take_relayed(binding, batch)
        outcomes = [o for batch in batches for o in (*batch.outcomes, *batch.fired)]
        dead = [record for batch in batches for record in batch.dead]
        steps = write_outcomes(binding.run, segment, outcomes, dead, binding.deployment_id)
        before_commit()
    return steps


def write_outcomes(
    run: Run,
    segment: Segment,
    outcomes: Sequence[RecordOutcome],
    dead: Sequence[DeadRecord],
    deployment_id: UUID,
) -> int:
    """The rows of taken records, in the caller's transaction; returns the steps created.
    Also what a webhook request and a schedule tick write, with no offsets to move."""
    events = SegmentEvents(run)
    steps: list[Step] = []
    rows: list[ResultRow] = []
    source_node = str(segment.source["id"])
    for outcome in outcomes:
        if outcome.absorbed:
            continue
        record = outcome.record
        at = record.at or (source_node, "out")
        if record.event_id is not None:  # relayed: a step's output, stored already
            source_id, at = record.event_id, ("", "")
        else:
            source_id = events.add(*at, record.raw or record.payload, record, None)
        for exit in outcome.exits:
            event_id = source_id
            if (exit.node_id, exit.port) != at:
                event_id = events.add(exit.node_id, exit.port, exit.payload, record, source_id)
            steps += [new_step(run, segment.nodes[t], [event_id], []) for t in exit.targets]
        rows += [
            ResultRow(tenant_id=run.tenant_id, run=run, table=table, data=row, effect_key=key)
            for table, row, key in outcome.rows
        ]
    events.copy()
    if rows:
        ResultRow.objects.bulk_create(rows)
    if dead:
        DeadLetter.objects.bulk_create(
            [_dead_letter(run.tenant_id, deployment_id, record) for record in dead]
        )
    if steps:
        store.create_rows(steps)
        store.move_open_steps(run, len(steps))
        hand_off_on_commit(
            run.tenant_id, [StepMessage(run.tenant_id, step.id, step.queue) for step in steps]
        )
    return len(steps)


class SegmentEvents:
    """A segment's events as rows for one COPY. A micro-batch writes thousands; building a
    Django model and asking each of its fields for its database value costs more than the
    COPY itself (bench kafka), and these rows have no defaults or signals to honour."""

    COLUMNS = (
        "id", "tenant_id", "run_id", "producer_id", "seq", "node_id", "port", "key",
        "payload", "event_time", "scopes", "parent", "origin", "created_at",
    )  # fmt: skip

    def __init__(self, run: Run) -> None:
        self.run = run
        self.now = timezone.now()
        self.rows: list[tuple[Any, ...]] = []

    def add(
        self, node_id: str, port: str, payload: JSON | str, record: Record, parent: UUID | None
    ) -> UUID:
        """`payload` as a dict, or as JSON text already."""
        event_id = uuid4()
        text = payload if isinstance(payload, str) else json.dumps(payload, default=str)
        self.rows.append(
            (
                event_id, self.run.tenant_id, self.run.id, None, 0, node_id, port,
                record.key, text, record.event_time, "[]",
                parent, record.origin, self.now,
            )
        )  # fmt: skip
        return event_id

    def copy(self) -> None:
        if not self.rows:
            return
        statement = f"COPY runs_event ({', '.join(self.COLUMNS)}) FROM STDIN"
        with connection.cursor() as cursor, cursor.copy(statement) as copy:
            for row in self.rows:
                copy.write_row(row)


def send_produced(outcomes: Sequence[RecordOutcome]) -> kafka.Deliveries:
    """Sends what the outcomes' Kafka sinks emit, each record carrying its effect key;
    `wait()` on the result returns once the broker acknowledged all of them (the caller
    commits after), else raises DeliveryFailed. No sink records, no Kafka client at all."""
    records = [p for outcome in outcomes for p in outcome.produce]
    deliveries = kafka.Deliveries(kafka.shared_producer() if records else None)
    for p in records:
        headers: list[tuple[str, str | bytes | None]] = [
            (kafka.EFFECT_HEADER, p.effect_key.encode())
        ]
        deliveries.send(p.topic, p.value, key=p.key, headers=headers)
    return deliveries


def produce(outcomes: Sequence[RecordOutcome]) -> None:
    """send_produced, then wait for the broker's acknowledgements."""
    send_produced(outcomes).wait()


def _check_binding(binding: Binding) -> None:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT version_id, status FROM streams_deployment"
            " WHERE id = %s AND tenant_id = %s FOR SHARE",
            [binding.deployment_id, binding.tenant_id],
        )
        row = cursor.fetchone()
    if row is None:
        raise Fenced("the deployment is gone")
    version_id, status = row
    if version_id != binding.version_id:
        raise Fenced("another version was deployed")
    if status not in CONSUMING:
        raise Fenced(f"the deployment is {status}")


def _move_offset(binding: Binding, batch: PartitionBatch) -> None:
    state = batch.state
    marks, version = "", ""
    if state is not None:  # the watermark and late counts go with the state they made
        marks = " watermark_ms = %s, late = %s::jsonb, state_version = state_version + 1,"
        version = " AND state_version = %s"
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE streams_partitionoffset SET next_offset = %s,"
            " high_watermark = GREATEST(high_watermark, %s), records = records + %s,"
            f" dead_letters = dead_letters + %s, rate = %s,{marks} updated_at = now()"
            " WHERE deployment_id = %s AND topic = %s AND partition = %s AND next_offset = %s"
            + version,
            [
                batch.next_offset,
                batch.high_watermark,
                len(batch.outcomes),
                len(batch.dead),
                batch.rate,
                *([state.watermark_ms, json.dumps(state.late)] if state is not None else []),
                binding.deployment_id,
                batch.topic,
                batch.partition,
                batch.read_at,
                *([state.version] if state is not None else []),
            ],
        )
        if cursor.rowcount != 1:
            raise Fenced(
                f"{batch.topic}:{batch.partition} moved past offset {batch.read_at}, or its"
                " state was written by another worker"
            )


def _take_relayed(binding: Binding, batch: PartitionBatch) -> None:
    """Relayed records are taken once: their outbox rows go now. (A copy produced again was
    left out of the batch, its row gone already.)"""
    with connection.cursor() as cursor:
        cursor.execute(
            "DELETE FROM runs_streamrelay WHERE tenant_id = %s AND id = ANY(%s)",
            [binding.tenant_id, list(batch.relayed.values())],
        )
        if cursor.rowcount != len(batch.relayed):
            raise Fenced(f"{batch.topic}:{batch.partition}: relayed records taken elsewhere")


def fired_dead(batch_topic: str, partition: int, failed: FiredError) -> DeadRecord:
    """A window's result that a node after the window failed on."""
    return DeadRecord(
        error=f"window result {failed.origin}: {failed.error}",
        payload=json.dumps(failed.payload, default=str),
        key=failed.key,
        topic=batch_topic,
        partition=partition,
    )


def _dead_letter(tenant_id: int, deployment_id: UUID, record: DeadRecord) -> DeadLetter:
    return DeadLetter(
        tenant_id=tenant_id,
        deployment_id=deployment_id,
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        # A text column takes no NUL: a record that was not even JSON may hold one.
        key=record.key[:1000].replace("\x00", "\ufffd"),
        error=record.error[:2000].replace("\x00", "\ufffd"),
        payload=record.payload.replace("\x00", "\ufffd"),
    )


def start_offsets(
    binding: Binding, wanted: Sequence[tuple[str, int, int]]
) -> dict[tuple[str, int], int]:
    """The next offset PostgreSQL holds for each (topic, partition); a partition seen for
    the first time starts at the offset given for it (from the source's start_from)."""
    with transaction.atomic():
        for topic, partition, offset in wanted:
            with connection.cursor() as cursor:
                cursor.execute(
                    "INSERT INTO streams_partitionoffset (tenant_id, deployment_id, topic,"
                    " partition, next_offset, high_watermark, records, dead_letters, rate,"
                    " late, state_version, updated_at)"
                    " VALUES (%s, %s, %s, %s, %s, 0, 0, 0, 0, '{}', 0, now())"
                    " ON CONFLICT (deployment_id, topic, partition) DO NOTHING",
                    [binding.tenant_id, binding.deployment_id, topic, partition, offset],
                )
        return read_offsets(binding.deployment_id, binding.tenant_id)


def read_offsets(deployment_id: UUID, tenant_id: int) -> dict[tuple[str, int], int]:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT topic, partition, next_offset FROM streams_partitionoffset"
            " WHERE deployment_id = %s AND tenant_id = %s",
            [deployment_id, tenant_id],
        )
        return {(topic, partition): offset for topic, partition, offset in cursor.fetchall()}


def note_high_watermarks(binding: Binding, marks: dict[tuple[str, int], int]) -> None:
    """The partitions' ends as a worker sees them while idle, for lag on the page."""
    with connection.cursor() as cursor:
        for (topic, partition), mark in marks.items():
            cursor.execute(
                "UPDATE streams_partitionoffset SET high_watermark = %s, rate = 0,"
                " updated_at = now() WHERE deployment_id = %s AND topic = %s"
                " AND partition = %s AND (high_watermark <> %s OR rate <> 0)",
                [mark, binding.deployment_id, topic, partition, mark],
            )
