"""A graph's stream segment, and running one record through it in process.

The segment is the source and the nodes after it that can run inside a micro-batch: cheap
operators (template, switch, filter, sink.table; no fan-out, no collect, not marked
`chain: false`) and Kafka sinks. Where an edge leaves the segment (an LLM, a tool) the
record's event there becomes the input of a durable step, created in the batch's
transaction (DESIGN "Two executors, one graph").

Running a record is pure: what it produces (events to store, rows to write, records to
produce, steps to create) comes back as a RecordOutcome and the checkpoint writes it. A
record that makes any node raise produces nothing but its dead letter: a record is taken
whole or not at all.
"""

import hashlib
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from typing import TYPE_CHECKING, Any
from uuid import UUID

from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match

from apps.graphs.validation import as_edge, source_node
from workers.operators import REGISTRY
from workers.operators.base import JSON, InputEvent, Operator, PermanentError, StepContext
from workers.operators.streams import KafkaSink
from workers.operators.windows import Fired, Memory, StatefulOperator, WindowOperator, event_key

if TYPE_CHECKING:
    from apps.streams.state import PartitionState

# How many nodes one record may pass through in a segment: a graph is acyclic, so this only
# bounds a pathological fan of switches.
MAX_VISITS = 1000
MAX_EFFECT_KEY = 200
# An idle partition's watermark starts following the wall clock after this long.
DEFAULT_IDLE_TIMEOUT_S = 30.0
NOWHERE: tuple[list[str], tuple[str, ...]] = ([], ())


def in_segment(node: JSON) -> bool:
    operator = REGISTRY[node["type"]]
    if operator.segment_sink:
        return True
    return (
        operator.cheap
        and not operator.opens_scope
        and not operator.is_collect
        and not operator.is_source
        and node.get("chain", True) is not False
    )


@dataclass
class Record:
    """One record as the source decoded it. Not changed once made (not frozen: a frozen
    dataclass sets each field through object.__setattr__, a cost per record)."""

    origin: str  # "<topic>:<partition>:<offset>", or a webhook delivery's or a tick's id
    payload: JSON
    key: str
    event_time: datetime
    # The payload's JSON text as it arrived, when it is UTF-8: stored as the record's event
    # without encoding the payload again.
    raw: str | None = None
    # Where the record's own event is: emitted on (node, port) by a window that fired (None:
    # the source's "out"), or already stored (`event_id`: a step's output relayed `into` a
    # stateful node).
    at: tuple[str, str] | None = None
    into: str = ""
    event_id: UUID | None = None

    @cached_property
    def event_ms(self) -> int:
        return int(self.event_time.timestamp() * 1000)


@dataclass(slots=True)
class Exit:
    """An event leaving the segment on (node, port) into the durable steps of `targets`."""

    node_id: str
    port: str
    payload: JSON
    targets: tuple[str, ...]


@dataclass(slots=True)
class Produce:
    topic: str
    key: bytes | None
    value: bytes
    effect_key: str


@dataclass
class RecordOutcome:
    record: Record
    exits: list[Exit] = field(default_factory=list)
    rows: list[tuple[str, JSON, str]] = field(default_factory=list)  # (table, row, effect key)
    produce: list[Produce] = field(default_factory=list)
    # The record went into windows or memory and nowhere else: nothing refers to an event of
    # it, so none is stored (Kafka keeps the record at its origin; the state, what it added).
    absorbed: bool = False


@dataclass(frozen=True)
class FiredError:
    """A window that fired, but a node after it failed on its result: a dead letter."""

    origin: str
    payload: JSON
    key: str
    error: str


class Segment:
    """The stream segment of one graph version, planned once per version."""

    def __init__(self, spec: JSON, *, scope: str) -> None:
        # `scope` makes effect keys unique per deployment: the same record offsets mean
        # different records in another deployment's topics.
        self.spec = spec
        self.scope = scope
        self.nodes: dict[str, JSON] = {node["id"]: node for node in spec["nodes"]}
        self.source = source_node(spec)
        self.inside = {
            node_id for node_id, node in self.nodes.items() if node_id != self.source["id"]
            and in_segment(node)
        }  # fmt: skip
        self.max_fanout = int(spec.get("policies", {}).get("max_fanout", 1000))
        # The same for every record: made once.
        self._contexts = {
            node_id: self._context(node_id, self.nodes[node_id].get("config", {}))
            for node_id in self.inside
        }
        # (node, port) -> targets, in the spec's order: asked once per node per record.
        self.targets: dict[tuple[str, str], list[str]] = defaultdict(list)
        for edge in map(as_edge, spec.get("edges", [])):
            self.targets[(edge.source, edge.port)].append(edge.target)
        # The same split by executor: (targets run here, targets that become steps).
        self.split: dict[tuple[str, str], tuple[list[str], tuple[str, ...]]] = {
            edge: (
                [t for t in targets if t in self.inside],
                tuple(t for t in targets if t not in self.inside),
            )
            for edge, targets in self.targets.items()
        }
        # Windows and memory nodes: they keep state per partition, so records reach them
        # only through a Kafka worker's micro-batch with that partition's state.
        self.stateful: dict[str, StatefulOperator] = {
            node_id: operator
            for node_id in sorted(self.inside)
            if isinstance(operator := REGISTRY[self.nodes[node_id]["type"]], StatefulOperator)
        }
        # Per stateful node, what each record needs: (operator, config, state owner, and for
        # a window its config as numbers).
        self._plans = {
            node_id: (
                operator,
                config := self.nodes[node_id].get("config", {}),
                self.owner(node_id),
                operator.params(config) if isinstance(operator, WindowOperator) else None,
            )
            for node_id, operator in self.stateful.items()
        }
        config = self.source.get("config", {})
        self.max_delay_ms = round(float(config.get("max_delay_s", 0)) * 1000)
        self.idle_timeout_s = float(config.get("idle_timeout_s", DEFAULT_IDLE_TIMEOUT_S))

    def owner(self, node_id: str) -> str:
        return self.stateful[node_id].state_owner(node_id, self.nodes[node_id].get("config", {}))

    @cached_property
    def input_validator(self) -> Draft202012Validator | None:
        schema = self.source.get("config", {}).get("input_schema")
        return Draft202012Validator(schema) if schema else None

    def check_input(self, payload: JSON) -> None:
        if self.input_validator is None:
            return
        try:
            error = best_match(self.input_validator.iter_errors(payload))
        except RecursionError:
            raise PermanentError("input schema: the payload is nested too deeply") from None
        if error is not None:
            where = ".".join(str(part) for part in error.absolute_path) or "the payload"
            raise PermanentError(f"input schema: {where}: {error.message}")

    def run(self, record: Record, state: "PartitionState | None" = None) -> RecordOutcome:
        """What one record produces; raises SegmentError naming the node that failed. With
        stateful nodes, `state` is the record's partition's: the record's changes to it are
        undone if it fails, and its event time moves the watermark once it has passed."""
        if self.stateful and state is None:
            raise SegmentError(
                next(iter(self.stateful)), "windows and memory run only on a Kafka worker"
            )
        if state is None:
            return self._run(record, None)
        state.begin_record()
        try:
            outcome = self._run(record, state)
        except BaseException:
            state.undo_record()
            raise
        state.end_record()
        state.advance(record.event_ms - self.max_delay_ms)
        state.last_record_at = time.monotonic()
        return outcome

    def _run(self, record: Record, state: "PartitionState | None") -> RecordOutcome:
        outcome = RecordOutcome(record)
        visits: dict[str, int] = defaultdict(int)
        pending: list[tuple[str, str, JSON]] = []
        if record.into:
            visits[record.into] += 1
            pending += self._visit(record.into, record.payload, outcome, visits, state)
        else:
            if record.at is None:
                self.check_input(record.payload)
            node_id, port = record.at or (self.source["id"], "out")
            pending.append((node_id, port, record.payload))
        total_visits = 0
        while pending:
            node_id, port, payload = pending.pop()
            here, leaving = self.split.get((node_id, port), NOWHERE)
            if leaving:
                outcome.exits.append(Exit(node_id, port, payload, leaving))
            for target in here:
                visits[target] += 1
                total_visits += 1
                if total_visits > MAX_VISITS:
                    raise SegmentError(target, f"more than {MAX_VISITS} node visits")
                pending += self._visit(target, payload, outcome, visits, state)
        if outcome.absorbed and record.at is None:
            outcome.absorbed = not (outcome.exits or outcome.rows or outcome.produce)
        else:
            outcome.absorbed = False
        return outcome

    def _visit(
        self,
        node_id: str,
        payload: JSON,
        outcome: RecordOutcome,
        visits: dict[str, int],
        state: "PartitionState | None",
    ) -> list[tuple[str, str, JSON]]:
        try:
            if node_id in self.stateful:
                outcome.absorbed = True  # unless it also goes somewhere (_run decides)
                return self._run_stateful(node_id, payload, outcome.record, state)
            return self._run_node(node_id, payload, outcome, visits[node_id])
        except PermanentError as exc:
            raise SegmentError(node_id, str(exc)) from None
        except SegmentError:
            raise
        except Exception as exc:  # an operator bug must not stall the partition
            raise SegmentError(node_id, f"{type(exc).__name__}: {exc}") from None

    def _run_stateful(
        self, node_id: str, payload: JSON, record: Record, state: "PartitionState | None"
    ) -> list[tuple[str, str, JSON]]:
        if state is None:
            raise SegmentError(node_id, "windows and memory run only on a Kafka worker")
        operator, config, owner, params = self._plans[node_id]
        key = event_key(config, payload, record.key) if "key" in config else record.key
        view = state.node(owner)
        if params is not None:
            assert isinstance(operator, WindowOperator)
            if operator.add(params, view, key, record.event_ms, payload):
                return []
            state.count_late(node_id)
            return [(node_id, "late", payload)]
        assert isinstance(operator, Memory)
        return [(node_id, "out", operator.apply(config, view, key, record.event_ms, payload))]

    def fire(
        self, state: "PartitionState", now_ms: int, *, drain: bool = False
    ) -> tuple[list[RecordOutcome], list[FiredError]]:
        """The windows of this partition the watermark has closed (and early results due;
        with `drain`, every open window), run through the nodes after them; memory entries
        past their TTL go."""
        outcomes: list[RecordOutcome] = []
        failed: list[FiredError] = []
        for node_id, operator in self.stateful.items():
            view = state.node(self.owner(node_id))
            if isinstance(operator, Memory):
                operator.expire(view)
                continue
            assert isinstance(operator, WindowOperator)
            params = self._plans[node_id][3]
            assert params is not None
            for fired in operator.fire(params, view, node_id, now_ms, drain=drain):
                record = self.fired_record(node_id, fired)
                try:
                    outcomes.append(self._run(record, state))
                except SegmentError as exc:
                    failed.append(FiredError(fired.origin, fired.payload, fired.key, str(exc)))
        return outcomes, failed

    def fired_record(self, node_id: str, fired: Fired) -> Record:
        event_time = datetime.fromtimestamp(fired.event_time_ms / 1000, tz=UTC)
        return Record(fired.origin, fired.payload, fired.key, event_time, at=(node_id, "out"))

    def _run_node(
        self, node_id: str, payload: JSON, outcome: RecordOutcome, visit: int
    ) -> list[tuple[str, str, JSON]]:
        node = self.nodes[node_id]
        operator: Operator = REGISTRY[node["type"]]
        config = node.get("config", {})
        if isinstance(operator, KafkaSink):
            key, value = operator.record(config, payload, outcome.record.key)
            effect_key = self.effect_key(outcome.record.origin, node_id, visit)
            outcome.produce.append(Produce(config["topic"], key, value, effect_key))
            return [(node_id, "out", payload)]
        result = operator.run(self._contexts[node_id], [InputEvent("", payload)])
        for table, row in result.table_rows:
            effect_key = self.effect_key(outcome.record.origin, node_id, visit)
            outcome.rows.append((table, row, effect_key))
        return [(node_id, output.port, output.payload) for output in result.outputs]

    def _context(self, node_id: str, config: JSON) -> StepContext:
        return StepContext(
            run_id="",
            step_id="",
            node_id=node_id,
            config=config,
            attempt=1,
            max_fanout=self.max_fanout,
            heartbeat=_no_heartbeat,
        )

    def effect_key(self, origin: str, node_id: str, visit: int) -> str:
        """The same on every replay of the record, so a copy produced again after a crash
        carries the key of the first and a downstream consumer can drop it."""
        key = f"{self.scope}:{origin}:{node_id}:{visit}"
        if len(key) <= MAX_EFFECT_KEY:
            return key
        return f"{self.scope}:{hashlib.sha256(key.encode()).hexdigest()}"


class SegmentError(Exception):
    def __init__(self, node_id: str, message: str) -> None:
        super().__init__(f"node '{node_id}': {message}")
        self.node_id = node_id


def _no_heartbeat() -> None:
    return None


def segment_summary(segment: Segment) -> dict[str, Any]:
    """Which nodes run in the segment and which start durable steps, for the page."""
    boundary = sorted(
        {
            target
            for node_id in [segment.source["id"], *segment.inside]
            for port in REGISTRY[segment.nodes[node_id]["type"]].output_ports(
                segment.nodes[node_id].get("config", {})
            )
            for target in segment.targets.get((node_id, port), [])
            if target not in segment.inside
        }
    )
    return {"source": segment.source["id"], "inside": sorted(segment.inside), "steps": boundary}
