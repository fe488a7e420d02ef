"""The Kafka worker: consumes every active Kafka deployment's topics in micro-batches and runs
their stream segments in process.

One consumer per deployment per worker process, all in one consumer group per deployment, so
Kafka spreads a deployment's partitions over however many workers run (scaled by
partitions). Deployments take turns in one loop: a tenant's backlog gets one batch per turn
and cannot hold another tenant's deployment up.

A batch: consume up to SLUICE_KAFKA_BATCH records, run each through the segment (a record
that fails goes to the dead letters), produce what Kafka sinks emit and wait for the
broker's acknowledgement, then commit the checkpoint (checkpoint.commit_batch) and only
after that tell Kafka the offsets (for lag tools; PostgreSQL's are the ones that count). On
(re)assignment a partition is read from the offset PostgreSQL holds.
"""

import json
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from uuid import UUID

import psycopg
from confluent_kafka import (
    OFFSET_END,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)
from django.db import DatabaseError, DataError, close_old_connections, connection

from apps.runs.models import Run
from apps.streams import relay
from apps.streams import state as partition_state
from apps.streams.checkpoint import (
    Binding,
    DeadRecord,
    Fenced,
    PartitionBatch,
    commit_batch,
    fired_dead,
    note_high_watermarks,
    read_offsets,
    send_produced,
    start_offsets,
)
from apps.streams.drain import finish_drain
from apps.streams.models import ACTIVE_DEPLOYMENT_STATUSES, Deployment, DeploymentStatus, SourceKind
from apps.streams.segment import Record, RecordOutcome, Segment, SegmentError
from apps.streams.state import PartitionState
from apps.tenants.context import tenant_context
from apps.tenants.models import Tenant
from sluice.env import env_float, env_int
from workers import kafka
from workers.operators.base import PermanentError
from workers.operators.streams import KafkaSource, parse_time

log = logging.getLogger(__name__)

BATCH = env_int("SLUICE_KAFKA_BATCH", 5000, minimum=1)
# How often the worker looks for deployments started, changed, paused or stopped.
RECONCILE_S = env_float("SLUICE_KAFKA_RECONCILE_S", 1.0)
# How often an idle deployment's partition ends are read again (lag, drains).
IDLE_MARKS_S = 5.0
POLL_S = 0.1
# A turn of several deployments that found nothing waits this long before the next.
IDLE_S = 0.01
# How often a partition that took no records checks for windows to fire (its watermark
# following the wall clock once idle, early results due).
TICK_S = 0.5
# How often a deployment with windows after steps relays those steps' outputs.
RELAY_S = 0.2
ENDS_ATTEMPTS = 10


@dataclass(frozen=True)
class Deployed:
    """A deployment as the worker last read it."""

    id: UUID
    tenant_id: int
    graph_id: int
    version_id: int
    status: str
    group_id: str
    spec: dict
    run: Run
    tenant: Tenant

    @classmethod
    def of(cls, deployment: Deployment) -> "Deployed":
        return cls(
            id=deployment.id,
            tenant_id=deployment.tenant_id,
            graph_id=deployment.graph_id,
            version_id=deployment.version_id,
            status=deployment.status,
            group_id=deployment.group_id,
            spec=deployment.version.spec,
            run=deployment.run,
            tenant=deployment.tenant,
        )


def active_kafka_deployments() -> dict[UUID, tuple[int, str]]:
    """Every tenant's (the worker serves the whole installation, as Celery workers do): id
    -> (version, status). Asked every second: the versions' specs are read only when a
    consumer is made (deployed)."""
    rows = Deployment.unscoped_all_tenants.filter(
        source_kind=SourceKind.KAFKA, status__in=ACTIVE_DEPLOYMENT_STATUSES
    ).values_list("id", "version_id", "status")
    return {deployment_id: (version_id, status) for deployment_id, version_id, status in rows}


def deployed(deployment_ids: list[UUID]) -> list[Deployed]:
    rows = Deployment.unscoped_all_tenants.filter(id__in=deployment_ids).select_related(
        "version", "run", "tenant"
    )
    return [Deployed.of(row) for row in rows]


class DeploymentConsumer:
    """One deployment's consumer in this worker, bound to the version it was started with
    (a redeploy replaces it)."""

    def __init__(self, deployed: Deployed, client_id: str, *, static: bool = False) -> None:
        self.deployed = deployed
        self.binding = Binding(deployed.id, deployed.tenant_id, deployed.version_id, deployed.run)
        self.segment = Segment(deployed.spec, scope=deployed.id.hex[:12])
        self.config = self.segment.source.get("config", {})
        self.source = KafkaSource()
        # Where each assigned partition is read from: PostgreSQL's next offset, moved after
        # each committed batch.
        self.positions: dict[tuple[str, int], int] = {}
        # With windows or memory: each assigned partition's state, as of its position.
        self.states: dict[tuple[str, int], PartitionState] = {}
        self.ticked_at: dict[tuple[str, int], float] = {}
        self.paused = False
        self.busy = False  # the last poll took records
        self.marks_at = 0.0
        self.consumer: Consumer = kafka.consumer(
            deployed.group_id, member=client_id if static else None, **{"client.id": client_id}
        )
        # Step outputs for windows or memory come back through the relay topic.
        self.relay_nodes = relay.relay_nodes(self.segment)
        self.relay_topic = ""
        self.relayed_at = 0.0
        topics = list(self.config["topics"])
        if self.relay_nodes:
            self.relay_topic = kafka.relay_topic(deployed.tenant.slug, deployed.id.hex[:12])
            kafka.ensure_topic(self.relay_topic, relay.RELAY_PARTITIONS)
            topics.append(self.relay_topic)
        self.consumer.subscribe(
            topics,
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_revoke,
        )
        self.apply_status(deployed.status)

    # -- assignment --------------------------------------------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        held = read_offsets(self.binding.deployment_id, self.binding.tenant_id)
        wanted = [
            (p.topic, p.partition, self._start_offset(p))
            for p in partitions
            if (p.topic, p.partition) not in held
        ]
        offsets = start_offsets(self.binding, wanted) if wanted else held
        for p in partitions:
            p.offset = offsets[(p.topic, p.partition)]
            self.positions[(p.topic, p.partition)] = p.offset
        self._load_states([(p.topic, p.partition) for p in partitions])
        consumer.assign(partitions)
        if self.paused:
            consumer.pause(partitions)
        log.info("deployment %s: assigned %s", self.deployed.id, _names(partitions))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for p in partitions:
            self.positions.pop((p.topic, p.partition), None)
            self.states.pop((p.topic, p.partition), None)
        consumer.unassign()
        log.info("deployment %s: revoked %s", self.deployed.id, _names(partitions))

    def _start_offset(self, partition: TopicPartition) -> int:
        """Where a partition never read before starts, from the source's start_from."""
        low, high = self._ends(partition)
        start_from = self.config.get("start_from", "earliest")
        if partition.topic == self.relay_topic:
            return int(low)  # every relayed record counts
        if start_from == "latest":
            return int(high)
        if start_from == "timestamp":
            at = _epoch_ms(self.config["start_timestamp"])
            found = self.consumer.offsets_for_times(
                [TopicPartition(partition.topic, partition.partition, at)], timeout=10
            )[0]
            return int(high) if found.offset in (OFFSET_END, -1) else int(found.offset)
        return int(low)

    def _ends(self, partition: TopicPartition) -> tuple[int, int]:
        """The partition's first and next offsets. Asked while a partition's leader moves (or
        of a topic just made) the broker says so for a moment: asked again."""
        for attempt in range(ENDS_ATTEMPTS):
            try:
                low, high = self.consumer.get_watermark_offsets(partition, timeout=10)
                return int(low), int(high)
            except KafkaException as exc:
                if attempt == ENDS_ATTEMPTS - 1:
                    raise
                log.info("%s:%s: %s; asking again", partition.topic, partition.partition, exc)
                time.sleep(0.2 * (attempt + 1))
        raise AssertionError("unreachable")

    def seek_to_held(self) -> None:
        """Read every assigned partition again from the offset PostgreSQL holds."""
        held = read_offsets(self.binding.deployment_id, self.binding.tenant_id)
        for topic, partition in list(self.positions):
            offset = held.get((topic, partition))
            if offset is None:
                continue
            self.positions[(topic, partition)] = offset
            try:
                self.consumer.seek(TopicPartition(topic, partition, offset))
            except KafkaException as exc:  # not yet fetching: assign's offset still holds
                log.debug("seek %s:%s: %s", topic, partition, exc)
        self._load_states(list(self.positions))  # changes of refused batches are gone too

    def _load_states(self, partitions: list[tuple[str, int]]) -> None:
        if self.segment.stateful and partitions:
            self.states.update(
                partition_state.load(self.binding.deployment_id, self.binding.tenant_id, partitions)
            )

    # -- status ------------------------------------------------------------------------

    def apply_status(self, status: str) -> None:
        paused = status == DeploymentStatus.PAUSED
        if paused and not self.paused:
            self.consumer.pause(self.consumer.assignment())
        elif self.paused and not paused:
            self.seek_to_held()  # records fetched before the pause were never taken
            self.consumer.resume(self.consumer.assignment())
        self.paused = paused
        self.deployed = replace(self.deployed, status=status)

    # -- batches -----------------------------------------------------------------------

    def poll(self, timeout: float) -> int:
        """Consume and commit one batch; the records taken (0 when idle or refused)."""
        if self.relay_topic and not self.paused:
            self._relay()
        messages = self.consumer.consume(num_messages=BATCH, timeout=timeout)
        by_partition: dict[tuple[str, int], list[Message]] = defaultdict(list)
        for message in messages:
            error = message.error()
            if error is not None:
                if error.code() != KafkaError._PARTITION_EOF:
                    log.warning("deployment %s: %s", self.deployed.id, error.str())
                continue
            by_partition[(str(message.topic()), int(message.partition() or 0))].append(message)
        batches = [
            batch
            for tp, msgs in by_partition.items()
            if tp in self.positions and (batch := self._batch(tp, msgs)) is not None
        ]
        self.busy = bool(batches)
        if self.states and not self.paused:
            batches += self._ticks({(b.topic, b.partition) for b in batches})
        if not batches:
            self._when_idle()
            return 0
        try:
            # Sent now, acknowledged by the time the transaction commits (its last act).
            deliveries = send_produced([o for b in batches for o in (*b.outcomes, *b.fired)])
            commit_batch(self.binding, self.segment, batches, before_commit=deliveries.wait)
        except (Fenced, kafka.DeliveryFailed) as exc:
            log.info("deployment %s: batch refused (%s); reading again", self.deployed.id, exc)
            self.seek_to_held()
            return 0
        except (DataError, psycopg.DataError) as exc:
            log.warning("deployment %s: PostgreSQL refused a value: %s", self.deployed.id, exc)
            try:
                self._commit_one_by_one(batches)
            except Fenced:
                self.seek_to_held()
                return 0
        for batch in batches:
            self.positions[(batch.topic, batch.partition)] = batch.next_offset
            if batch.state is not None:
                batch.state.committed()
        self._tell_kafka([b for b in batches if b.next_offset != b.read_at])
        return sum(len(batch.outcomes) + len(batch.dead) for batch in batches)

    def _batch(self, tp: tuple[str, int], messages: list[Message]) -> PartitionBatch | None:
        read_at = self.positions[tp]
        # Records before the held offset were fetched before a seek: already taken.
        messages = [m for m in messages if (m.offset() or 0) >= read_at]
        if not messages:
            return None
        started = time.monotonic()
        batch = PartitionBatch(
            topic=tp[0],
            partition=tp[1],
            read_at=read_at,
            next_offset=int(messages[-1].offset() or 0) + 1,
            high_watermark=self._cached_high(tp),
        )
        state = self.states.get(tp)
        batch.state = state
        if tp[0] == self.relay_topic:
            self._take_relayed(batch, messages, state)
        else:
            for message in messages:
                self._take(batch, message, state)
        if state is not None:
            self._fire(batch, state)
        elapsed = max(time.monotonic() - started, 1e-3)
        batch.rate = len(messages) / elapsed
        return batch

    def _relay(self) -> None:
        now = time.monotonic()
        if now - self.relayed_at < RELAY_S:
            return
        self.relayed_at = now
        try:
            relay.send_pending(
                self.deployed.tenant_id, self.deployed.graph_id, self.segment, self.relay_topic
            )
        except kafka.DeliveryFailed as exc:  # nothing marked sent: the next round sends again
            log.warning("deployment %s: relay: %s", self.deployed.id, exc)

    def _take_relayed(
        self, batch: PartitionBatch, messages: list[Message], state: PartitionState | None
    ) -> None:
        """Relayed step outputs: each row once, however many copies the topic holds."""
        decoded: list[tuple[Message, int, Record]] = []
        for message in messages:
            origin = f"{batch.topic}:{batch.partition}:{message.offset()}"
            try:
                relay_id, record = relay.decode(origin, message.value())
            except PermanentError as exc:
                batch.dead.append(self._dead(batch, message, str(exc)))
                continue
            decoded.append((message, relay_id, record))
        pending = relay.still_pending(self.deployed.tenant_id, [d[1] for d in decoded])
        for message, relay_id, record in decoded:
            if relay_id not in pending:
                continue  # taken already: a copy produced again
            pending.discard(relay_id)
            offset = int(message.offset() or 0)
            try:
                batch.outcomes.append(self.segment.run(record, state))
                batch.offsets.append(offset)
            except (PermanentError, SegmentError, RecursionError) as exc:
                batch.dead.append(self._dead(batch, message, str(exc)))
            batch.relayed[offset] = relay_id

    def _fire(self, batch: PartitionBatch, state: PartitionState, *, drain: bool = False) -> None:
        fired, failed = self.segment.fire(state, int(time.time() * 1000), drain=drain)
        batch.fired += fired
        batch.dead += [fired_dead(batch.topic, batch.partition, f) for f in failed]

    def _ticks(self, busy: set[tuple[str, int]]) -> list[PartitionBatch]:
        """For partitions that took nothing now: move an idle one's watermark with the wall
        clock and fire what closed (or early results due), as a batch of no records."""
        now = time.monotonic()
        batches = []
        for tp, state in self.states.items():
            if tp in busy or tp not in self.positions:
                continue
            last = self.ticked_at.get(tp, state.last_record_at)
            if now - last < TICK_S:
                continue
            self.ticked_at[tp] = now
            idle_from = state.last_record_at + self.segment.idle_timeout_s
            if state.watermark_ms is not None and now > idle_from:
                state.advance(state.watermark_ms + round((now - max(idle_from, last)) * 1000))
            position = self.positions[tp]
            batch = PartitionBatch(tp[0], tp[1], position, position, self._cached_high(tp))
            batch.state = state
            self._fire(batch, state)
            if batch.fired or batch.dead or state.dirty:
                batches.append(batch)
        return batches

    def _take(self, batch: PartitionBatch, message: Message, state: PartitionState | None) -> None:
        origin = f"{batch.topic}:{batch.partition}:{message.offset()}"
        key = message.key()
        value = message.value()
        try:
            payload, event_key, event_time = self.source.decode(
                self.config, key, value, message.timestamp()[1]
            )
            raw = _utf8(value)
            record = Record(origin, payload, event_key, event_time, raw)
            batch.outcomes.append(self.segment.run(record, state))
            batch.offsets.append(int(message.offset() or 0))
        except (PermanentError, SegmentError, RecursionError) as exc:
            batch.dead.append(self._dead(batch, message, str(exc)))

    def _dead(self, batch: PartitionBatch, message: Message, error: str) -> DeadRecord:
        return DeadRecord(
            error=error,
            payload=(message.value() or b"").decode("utf-8", "replace"),
            key=(message.key() or b"").decode("utf-8", "replace"),
            topic=batch.topic,
            partition=batch.partition,
            offset=message.offset(),
        )

    def _commit_one_by_one(self, batches: list[PartitionBatch]) -> None:
        """The last resort when PostgreSQL refuses a value the checks let through: each
        record in its own checkpoint, and one refused alone becomes a dead letter, so the
        partition moves on. (Its Kafka sink records were already sent and acknowledged:
        the dead letter says so.)"""
        if self.segment.stateful:
            self._commit_stateful_one_by_one(batches)
            return
        for batch in batches:
            items: list[tuple[int, RecordOutcome | DeadRecord]] = [
                *zip(batch.offsets, batch.outcomes, strict=True),
                *((int(dead.offset or 0), dead) for dead in batch.dead),
            ]
            read_at = batch.read_at
            for offset, item in sorted(items, key=lambda pair: pair[0]):
                single = PartitionBatch(
                    batch.topic, batch.partition, read_at, offset + 1, batch.high_watermark
                )
                if isinstance(item, DeadRecord):
                    single.dead.append(item)
                else:
                    single.outcomes.append(item)
                try:
                    commit_batch(self.binding, self.segment, [single])
                except (DataError, psycopg.DataError) as exc:
                    single.outcomes = []
                    single.dead = [_refused(batch, offset, item, exc)]
                    commit_batch(self.binding, self.segment, [single])
                read_at = offset + 1

    def _commit_stateful_one_by_one(self, batches: list[PartitionBatch]) -> None:
        """As _commit_one_by_one, from the partitions' committed state: each record runs
        again and commits alone with the state it changed and the windows it closed."""
        for batch in batches:
            tp = (batch.topic, batch.partition)
            self._load_states([tp])
            state = self.states[tp]
            items: list[tuple[int, RecordOutcome | DeadRecord]] = [
                *zip(batch.offsets, batch.outcomes, strict=True),
                *((int(dead.offset or 0), dead) for dead in batch.dead if dead.offset is not None),
            ]
            read_at = batch.read_at
            for offset, item in sorted(items, key=lambda pair: pair[0]):
                single = PartitionBatch(
                    batch.topic, batch.partition, read_at, offset + 1, batch.high_watermark
                )
                single.state = state
                if offset in batch.relayed:
                    single.relayed = {offset: batch.relayed[offset]}
                if isinstance(item, DeadRecord):
                    single.dead.append(item)
                else:
                    try:
                        single.outcomes.append(self.segment.run(item.record, state))
                        single.offsets.append(offset)
                        self._fire(single, state)
                    except (PermanentError, SegmentError) as exc:
                        single.dead.append(_refused(batch, offset, item, exc))
                try:
                    commit_batch(self.binding, self.segment, [single])
                except (DataError, psycopg.DataError) as exc:
                    self._load_states([tp])  # this record's changes are not taken
                    state = self.states[tp]
                    refused = PartitionBatch(
                        batch.topic, batch.partition, read_at, offset + 1, batch.high_watermark
                    )
                    refused.state = state
                    refused.relayed = single.relayed
                    refused.dead = [_refused(batch, offset, item, exc)]
                    commit_batch(self.binding, self.segment, [refused])
                state.committed()
                read_at = offset + 1

    def _cached_high(self, tp: tuple[str, int]) -> int:
        try:
            _low, high = self.consumer.get_watermark_offsets(TopicPartition(*tp), cached=True)
        except KafkaException:
            return 0
        return int(high) if high is not None and high >= 0 else 0

    def _tell_kafka(self, batches: list[PartitionBatch]) -> None:
        offsets = [TopicPartition(b.topic, b.partition, b.next_offset) for b in batches]
        try:
            self.consumer.commit(offsets=offsets, asynchronous=True)
        except KafkaException as exc:  # only lag tools read these
            log.debug("offset commit to Kafka: %s", exc)

    def _when_idle(self) -> None:
        """Every few seconds while idle: note the partitions' ends (lag on the page), and
        end a drain once every partition is read to its end."""
        now = time.monotonic()
        if now - self.marks_at < IDLE_MARKS_S or not self.positions:
            return
        self.marks_at = now
        # As the last fetch response said: asking the broker takes up to its fetch wait
        # (0.5 s) per partition, a stall for every deployment in this worker's loop. A
        # paused partition is not fetched, so its end is as of the pause.
        marks = {tp: high for tp in self.positions if (high := self._cached_high(tp)) > 0}
        note_high_watermarks(self.binding, marks)
        if self.deployed.status == DeploymentStatus.DRAINING:
            self._close_drained_windows(marks)
            finish_drain(self.binding.deployment_id, self.binding.tenant_id)

    def _close_drained_windows(self, marks: dict[tuple[str, int], int]) -> None:
        """A draining deployment's partitions read to their end fire their open windows:
        nothing more will come to close them (finish_drain waits for this)."""
        batches = []
        for tp, state in self.states.items():
            position = self.positions.get(tp)
            if position is None or position < marks.get(tp, 0):
                continue
            batch = PartitionBatch(tp[0], tp[1], position, position, marks.get(tp, 0))
            batch.state = state
            self._fire(batch, state, drain=True)
            if batch.fired or batch.dead or state.dirty:
                batches.append(batch)
        if not batches:
            return
        try:
            deliveries = send_produced([o for batch in batches for o in batch.fired])
            commit_batch(self.binding, self.segment, batches, before_commit=deliveries.wait)
        except (Fenced, kafka.DeliveryFailed) as exc:
            log.info("deployment %s: drain refused (%s)", self.deployed.id, exc)
            self.seek_to_held()
            return
        for batch in batches:
            if batch.state is not None:
                batch.state.committed()

    def close(self) -> None:
        try:
            self.consumer.close()  # leaves the group: its partitions move at once
        except (KafkaException, RuntimeError) as exc:
            log.debug("close: %s", exc)


class KafkaWorker:
    """The loop `manage.py kafka_worker` runs until `stop` is called (SIGTERM)."""

    def __init__(self, name: str, *, static: bool = False) -> None:
        # static: `name` is this worker's own for good (a supervisor restarts it under the
        # same one), so its consumers are static members of their groups.
        self.name = name
        self.static = static
        self.consumers: dict[UUID, DeploymentConsumer] = {}
        self.stopping = False
        self.reconciled_at = 0.0

    def stop(self) -> None:
        self.stopping = True

    def run(self) -> None:
        log.info("kafka worker %s: started", self.name)
        try:
            while not self.stopping:
                self.turn()
        finally:
            for consumer in self.consumers.values():
                consumer.close()
            self.consumers.clear()
            log.info("kafka worker %s: stopped", self.name)

    def turn(self) -> int:
        """One round: reconcile when due, then one batch per deployment."""
        try:
            if time.monotonic() - self.reconciled_at >= RECONCILE_S:
                self.reconcile()
            taken = 0
            consumers = list(self.consumers.values())
            for consumer in consumers:
                # A busy deployment (or the only one) may wait in its consume to fill a batch;
                # an idle one may not, or it would hold up the others' batches each turn.
                waits = consumer.busy or len(consumers) == 1
                # As a Celery task does: the deployment's tenant scopes every query.
                with tenant_context(consumer.deployed.tenant):
                    taken += self._poll(consumer, POLL_S if waits else 0.0)
            if not consumers:
                time.sleep(POLL_S)
            elif taken == 0 and len(consumers) > 1:
                time.sleep(IDLE_S)
            return taken
        except DatabaseError as exc:
            # PostgreSQL restarted or the connection broke: nothing was committed for the
            # batch in hand; start again from what PostgreSQL holds.
            log.warning("kafka worker %s: database error, retrying: %s", self.name, exc)
            connection.close()
            time.sleep(1.0)
            self.reconciled_at = 0.0
            for consumer in self.consumers.values():
                consumer.close()
            self.consumers.clear()
            return 0

    def _poll(self, consumer: DeploymentConsumer, timeout: float) -> int:
        try:
            return consumer.poll(timeout)
        except DatabaseError:
            raise  # every consumer starts again (turn)
        except Exception:
            # The broker refused something this consumer's client could not take in its
            # stride (raised through a rebalance callback, say), or a bug: nothing of the
            # batch in hand was committed. This deployment's consumer starts afresh at the
            # next reconcile, from PostgreSQL's offsets; other tenants' deployments go on.
            log.exception("deployment %s: consumer failed; rejoining", consumer.deployed.id)
            consumer.close()
            self.consumers.pop(consumer.deployed.id, None)
            self.reconciled_at = 0.0
            return 0

    def reconcile(self) -> None:
        close_old_connections()
        active = active_kafka_deployments()
        for deployment_id in list(self.consumers):
            current = active.get(deployment_id)
            consumer = self.consumers[deployment_id]
            if current is None or current[0] != consumer.deployed.version_id:
                consumer.close()  # stopped, or redeployed: a new consumer for the new version
                del self.consumers[deployment_id]
            elif current[1] != consumer.deployed.status:
                consumer.apply_status(current[1])
        new = [deployment_id for deployment_id in active if deployment_id not in self.consumers]
        for started in deployed(new) if new else []:
            if started.status in ACTIVE_DEPLOYMENT_STATUSES:  # still, when read again
                self.consumers[started.id] = DeploymentConsumer(
                    started, self.name, static=self.static
                )
        self.reconciled_at = time.monotonic()


def _names(partitions: list[TopicPartition]) -> str:
    return ", ".join(f"{p.topic}:{p.partition}@{p.offset}" for p in partitions)


def _epoch_ms(value: str) -> int:
    parsed = parse_time(value)
    return int(parsed.timestamp() * 1000) if parsed else 0


def _utf8(value: bytes | None) -> str | None:
    try:
        return value.decode("utf-8") if value is not None else None
    except UnicodeDecodeError:
        return None  # JSON in UTF-16 or UTF-32: the payload is encoded again instead


def _refused(
    batch: PartitionBatch, offset: int, item: RecordOutcome | DeadRecord, exc: Exception
) -> DeadRecord:
    if isinstance(item, DeadRecord):  # even its dead letter was refused: keep why, not what
        return replace(
            item, error=f"PostgreSQL refused it ({exc}); first: {item.error}"[:2000], payload=""
        )
    sent = " (its Kafka sink records were sent)" if item.produce else ""
    return DeadRecord(
        error=f"PostgreSQL refused the record{sent}: {exc}",
        payload=item.record.raw or json.dumps(item.record.payload, default=str),
        key=item.record.key,
        topic=batch.topic,
        partition=batch.partition,
        offset=offset,
    )
