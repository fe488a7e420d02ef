"""Windows and keyed state: operators that keep state between records, so they run only in a
Kafka deployment's stream segment, where their state commits with the micro-batch's offsets
(DESIGN "Event time and state").

The logic here is pure: it reads and replaces entries in a `NodeState` the executor gives
it (one per node and partition) and decides on event time and the partition's watermark
alone, never on the wall clock or on where a batch happened to end. So the records of a
partition, read again in offset order after a crash, put every window in the same state and
every window fires once with the same aggregate. (Early updates and idle partitions follow
the wall clock; the executor commits them with the state they saw.)

Times are integer epoch milliseconds throughout. Entry values are replaced, never changed in
place: the executor keeps the previous value to undo a record that fails further on.
"""

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, ClassVar, Protocol

from workers.operators.base import (
    JSON,
    REGISTRY,
    InputEvent,
    Operator,
    PermanentError,
    SpecIssue,
    StepContext,
    StepResult,
    register,
)
from workers.operators.builtin import FIELD_NAME, template_variables
from workers.operators.templating import render, syntax_error

MAX_WINDOW_S = 7 * 86400
MAX_COLLECT = 1000
MAX_MEMORY_ITEMS = 1000
MAX_ITEM_BYTES = 64_000
DAY_S = 86400
AGGREGATES = ("count", "sum", "min", "max", "avg", "collect", "first", "last")
# The output field each aggregate's value is under (count is always there).
RESULT_FIELD = {"collect": "events"}

SECONDS = {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_WINDOW_S}
KEY_TEMPLATE = {"type": "string", "minLength": 1, "maxLength": 1000}
AGGREGATE = {
    "type": "object",
    "additionalProperties": False,
    "required": ["op"],
    "properties": {
        "op": {"enum": list(AGGREGATES)},
        # The payload field sum, min, max and avg read.
        "field": FIELD_NAME,
        # collect: keep at most this many events (the earliest by event time); the
        # rest are counted in `dropped`.
        "limit": {"type": "integer", "minimum": 1, "maximum": MAX_COLLECT},
    },
}
WINDOW_COMMON = {
    # Sandboxed template over the payload; without it, the event's key.
    "key": KEY_TEMPLATE,
    "aggregate": AGGREGATE,
    "allowed_lateness_s": {"type": "number", "minimum": 0, "maximum": MAX_WINDOW_S},
    # Emit the open window's result so far (marked early) at most this often, wall clock.
    "early_every_s": {"type": "number", "minimum": 1, "maximum": DAY_S},
}


class NodeState(Protocol):
    """One stateful node's entries in one partition: key -> slot -> value, as the executor
    holds them for the batch in hand."""

    # Names the partition in origins, so a window's output is unique per deployment.
    partition: str

    @property
    def watermark_ms(self) -> int | None:
        """The partition's watermark (ms) before the record in hand; None until a record."""

    def slots(self, key: str) -> dict[str, JSON]: ...

    def put(self, key: str, slot: str, value: JSON) -> None: ...

    def delete(self, key: str, slot: str) -> None: ...

    def entries(self) -> Iterator[tuple[str, str, JSON]]: ...


@dataclass(slots=True)
class Fired:
    """A window result leaving the node on `out`: its payload, event time (the window's end)
    and an origin unique to this window (and this early update)."""

    key: str
    payload: JSON
    event_time_ms: int
    origin: str


@lru_cache(maxsize=4096)
def iso(ms: int) -> str:
    """Cached: a tumbling window's bounds are the same for every key."""
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat()


def event_key(config: JSON, payload: JSON, default: str) -> str:
    if "key" not in config:
        return default
    return render(config["key"], template_variables(payload))[:200]


class StatefulOperator(Operator):
    """Runs only in a Kafka stream segment: the segment gives it its state."""

    cheap = True
    stateful: ClassVar[bool] = True

    def run(self, ctx: StepContext, inputs: list[InputEvent]) -> StepResult:
        raise PermanentError(
            f"{self.type_name} keeps state between records, so it runs only in a stream"
            " deployment from source.kafka; deploy the graph as a stream"
        )

    def check(
        self, node_id: str, config: JSON, nodes: dict[str, JSON], parents: dict[str, set[str]]
    ) -> list[SpecIssue]:
        issues = []
        if "key" in config and (problem := syntax_error(config["key"])):
            issues.append(SpecIssue("key", problem))
        sources = {node["type"] for node in nodes.values() if not parents.get(node["id"])}
        if sources and sources != {"source.kafka"}:
            issues.append(
                SpecIssue(
                    "type",
                    "keeps state between records: it runs in stream deployments that start"
                    " with source.kafka (a webhook or schedule can feed one through a topic)",
                    in_config=False,
                )
            )
        return issues

    def state_owner(self, node_id: str, config: JSON) -> str:
        """Whose state the node's entries are: the node's own, unless shared by name."""
        return node_id


def state_owners(spec: JSON) -> dict[str, list[JSON]]:
    """The spec's state owners, each with the nodes whose state it is, in the spec's order:
    a window node owns its own; a memory node its own or, with `store`, the store's."""
    owners: dict[str, list[JSON]] = {}
    for node in spec.get("nodes", []):
        operator = REGISTRY.get(node.get("type", ""))
        if isinstance(operator, StatefulOperator):
            owner = operator.state_owner(node["id"], node.get("config", {}))
            owners.setdefault(owner, []).append(node)
    return owners


# -- aggregates ------------------------------------------------------------------------


def _number(payload: JSON, field: str) -> float:
    value = payload.get(field)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PermanentError(f"aggregate: field {field!r} must be a number, got {value!r}")
    return value


def new_acc(aggregate: JSON, payload: JSON, t_ms: int) -> Any:
    op = aggregate["op"]
    if op == "count":
        return None
    if op in ("sum", "min", "max"):
        return _number(payload, aggregate["field"])
    if op == "avg":
        return [_number(payload, aggregate["field"]), 1]
    if op == "collect":
        return [[t_ms, payload]]
    return [t_ms, payload]  # first, last


def merge_acc(aggregate: JSON, acc: Any, other: Any) -> Any:
    """The accumulator of two windows' (or a window's and one event's) events; returns a new
    value, the inputs unchanged."""
    op = aggregate["op"]
    if op == "count":
        return None
    if op == "sum":
        return acc + other
    if op == "min":
        return min(acc, other)
    if op == "max":
        return max(acc, other)
    if op == "avg":
        return [acc[0] + other[0], acc[1] + other[1]]
    if op == "collect":
        return sorted([*acc, *other], key=lambda item: item[0])
    if op == "first":
        return other if other[0] < acc[0] else acc
    return other if other[0] >= acc[0] else acc  # last: ties go to the later arrival


def result_fields(aggregate: JSON, acc: Any, count: int) -> JSON:
    op = aggregate["op"]
    if op == "count":
        return {}
    if op == "avg":
        return {"avg": acc[0] / acc[1]}
    if op == "collect":
        limit = int(aggregate.get("limit", 100))
        return {"events": [payload for _t, payload in acc[:limit]], "dropped": count - len(acc)}
    if op in ("first", "last"):
        return {op: acc[1]}
    return {op: acc}


def bound_acc(aggregate: JSON, acc: Any) -> Any:
    """collect keeps the earliest `limit` events; the others are only counted."""
    if aggregate["op"] == "collect":
        return acc[: int(aggregate.get("limit", 100))]
    return acc


def check_aggregate(config: JSON) -> list[SpecIssue]:
    aggregate = config.get("aggregate", {"op": "count"})
    if aggregate["op"] in ("sum", "min", "max", "avg") and "field" not in aggregate:
        return [SpecIssue("aggregate.field", f"is required for {aggregate['op']}")]
    return []


# -- windows ---------------------------------------------------------------------------


@dataclass(frozen=True)
class WindowParams:
    """A window node's config as numbers, worked out once per segment, not per record."""

    aggregate: JSON
    op: str
    lateness_ms: int
    early_ms: int  # 0: no early results
    size_ms: int = 0  # tumbling, hopping
    step_ms: int = 0  # hopping
    gap_ms: int = 0  # session


def _ms(seconds: Any) -> int:
    return round(float(seconds) * 1000)


class WindowOperator(StatefulOperator):
    """A window per key over event time. An event joins its open windows; one whose windows
    have all closed (end plus allowed lateness at or before the watermark) goes to `late`.
    A window fires once, when the watermark passes its end plus the allowed lateness."""

    def output_ports(self, config: JSON) -> set[str]:
        return {"out", "late"}

    def check(
        self, node_id: str, config: JSON, nodes: dict[str, JSON], parents: dict[str, set[str]]
    ) -> list[SpecIssue]:
        return super().check(node_id, config, nodes, parents) + check_aggregate(config)

    def params(self, config: JSON) -> WindowParams:
        aggregate = config.get("aggregate", {"op": "count"})
        return WindowParams(
            aggregate=aggregate,
            op=aggregate["op"],
            lateness_ms=_ms(config.get("allowed_lateness_s", 0)),
            early_ms=_ms(config.get("early_every_s", 0)),
            size_ms=_ms(config.get("size_s", 0)),
            step_ms=max(_ms(config.get("step_s", 0)), 1),
            gap_ms=_ms(config.get("gap_s", 0)),
        )

    def add(
        self, params: WindowParams, state: NodeState, key: str, t_ms: int, payload: JSON
    ) -> bool:
        """Puts the event into its open windows; False when it is late for all of them."""
        raise NotImplementedError

    def fire(
        self,
        params: WindowParams,
        state: NodeState,
        node_id: str,
        now_ms: int,
        *,
        drain: bool = False,
    ) -> list[Fired]:
        """Removes and returns the windows the watermark has closed, oldest first; open ones
        updated since their last early result get one when `early_every_s` has passed.
        `drain`: the deployment is draining and its partition is read to the end: every
        window closes now, marked `drained`."""
        closed: list[tuple[int, str, str, JSON]] = []
        early: list[tuple[str, str, JSON]] = []
        watermark = state.watermark_ms
        lateness, early_ms = params.lateness_ms, params.early_ms
        for key, slot, window in state.entries():
            if drain or (watermark is not None and window["end"] + lateness <= watermark):
                closed.append((window["end"], key, slot, window))
            elif (
                early_ms
                and window.get("changed")
                and now_ms - window.get("early_at", 0) >= early_ms
            ):
                early.append((key, slot, window))
        fired = []
        for _end, key, slot, window in sorted(closed, key=lambda item: (item[0], item[1])):
            state.delete(key, slot)
            result = self._fired(params, state, node_id, key, window, early=False)
            if drain:  # its own origin: the same window may open again after a redeploy
                result = Fired(
                    key, {**result.payload, "drained": True}, result.event_time_ms,
                    f"{result.origin}/drained"[:300],
                )  # fmt: skip
            fired.append(result)
        for key, slot, window in early:
            state.put(key, slot, {**window, "changed": False, "early_at": now_ms})
            fired.append(self._fired(params, state, node_id, key, window, early=True))
        return fired

    def _fired(
        self,
        params: WindowParams,
        state: NodeState,
        node_id: str,
        key: str,
        window: JSON,
        *,
        early: bool,
    ) -> Fired:
        payload = {
            "key": key,
            "start": iso(window["start"]),
            "end": iso(window["end"]),
            "count": window["count"],
            **result_fields(params.aggregate, window["acc"], window["count"]),
            "early": early,
        }
        origin = f"{state.partition}/{node_id}/{key}/{window['start']}"
        if early:
            origin += f"/early{window['count']}"
        return Fired(key, payload, window["end"], origin[:300])

    def _join(self, params: WindowParams, window: JSON, payload: JSON, t_ms: int) -> JSON:
        if params.op == "count":  # the common case, without the calls
            return {**window, "count": window["count"] + 1, "changed": True}
        aggregate = params.aggregate
        acc = merge_acc(aggregate, window["acc"], new_acc(aggregate, payload, t_ms))
        return {
            **window,
            "count": window["count"] + 1,
            "acc": bound_acc(aggregate, acc),
            "changed": True,
        }


class FixedWindows(WindowOperator):
    """Tumbling and hopping windows: aligned to the epoch, so every worker agrees where a
    window starts."""

    def starts(self, params: WindowParams, t_ms: int) -> list[int]:
        raise NotImplementedError

    def add(
        self, params: WindowParams, state: NodeState, key: str, t_ms: int, payload: JSON
    ) -> bool:
        size, lateness = params.size_ms, params.lateness_ms
        watermark = state.watermark_ms
        slots = state.slots(key)
        taken = False
        for start in self.starts(params, t_ms):
            if watermark is not None and start + size + lateness <= watermark:
                continue  # this window has closed
            slot = str(start)
            window = slots.get(slot)
            if window is None:
                acc = new_acc(params.aggregate, payload, t_ms) if params.op != "count" else None
                window = {"start": start, "end": start + size, "count": 1, "acc": acc}
                window["changed"] = True
            else:
                window = self._join(params, window, payload, t_ms)
            state.put(key, slot, window)
            slots = state.slots(key)  # the first put may have made the key's slots
            taken = True
        return taken


@register
class TumblingWindow(FixedWindows):
    type_name = "window.tumbling"
    description = "Per key, back-to-back windows of `size_s` in event time; one result each."
    config_schema = {
        "type": "object",
        "additionalProperties": False,
        "required": ["size_s"],
        "properties": {"size_s": SECONDS, **WINDOW_COMMON},
    }

    def starts(self, params: WindowParams, t_ms: int) -> list[int]:
        return [t_ms - t_ms % params.size_ms]


@register
class HoppingWindow(FixedWindows):
    type_name = "window.hopping"
    description = "Per key, windows of `size_s` starting every `step_s` (they overlap)."
    config_schema = {
        "type": "object",
        "additionalProperties": False,
        "required": ["size_s", "step_s"],
        "properties": {"size_s": SECONDS, "step_s": SECONDS, **WINDOW_COMMON},
    }

    def check(
        self, node_id: str, config: JSON, nodes: dict[str, JSON], parents: dict[str, set[str]]
    ) -> list[SpecIssue]:
        issues = super().check(node_id, config, nodes, parents)
        size, step = float(config["size_s"]), float(config["step_s"])
        if step > size:
            issues.append(SpecIssue("step_s", "must not be larger than size_s"))
        elif size / step > 100:
            issues.append(SpecIssue("step_s", "an event would fall in over 100 windows"))
        return issues

    def starts(self, params: WindowParams, t_ms: int) -> list[int]:
        size, step = params.size_ms, params.step_ms
        last = t_ms - t_ms % step
        return [start for start in range(last - size + step, last + 1, step) if start > t_ms - size]


@register
class SessionWindow(WindowOperator):
    type_name = "window.session"
    description = "Per key, events closer than `gap_s` in event time form one session."
    config_schema = {
        "type": "object",
        "additionalProperties": False,
        "required": ["gap_s"],
        "properties": {"gap_s": SECONDS, **WINDOW_COMMON},
    }

    def add(
        self, params: WindowParams, state: NodeState, key: str, t_ms: int, payload: JSON
    ) -> bool:
        aggregate, lateness = params.aggregate, params.lateness_ms
        watermark = state.watermark_ms
        start, end = t_ms, t_ms + params.gap_ms
        if watermark is not None and end + lateness <= watermark:
            return False
        counting = params.op == "count"
        acc, count = (None if counting else new_acc(aggregate, payload, t_ms)), 1
        merged: list[str] = []
        for slot, session in state.slots(key).items():
            if watermark is not None and session["end"] + lateness <= watermark:
                continue  # closed: it fires as it is
            if session["start"] < end and start < session["end"]:
                merged.append(slot)
                start, end = min(start, session["start"]), max(end, session["end"])
                if not counting:
                    acc = merge_acc(aggregate, session["acc"], acc)
                count += session["count"]
        for slot in merged:
            state.delete(key, slot)
        acc = acc if counting else bound_acc(aggregate, acc)
        session = {"start": start, "end": end, "count": count, "acc": acc, "changed": True}
        state.put(key, str(start), session)
        return True


# -- keyed state ---------------------------------------------------------------------------


@register
class Memory(StatefulOperator):
    type_name = "memory"
    description = (
        "Keyed state (a conversation's memory, a customer's profile): append to, read or"
        " clear the list kept for the event's key; the result is added to the payload."
    )
    config_schema = {
        "type": "object",
        "additionalProperties": False,
        "required": ["op"],
        "properties": {
            "op": {"enum": ["append", "read", "clear"]},
            # Nodes naming the same store share its entries (one appends, another reads).
            "store": FIELD_NAME,
            "key": KEY_TEMPLATE,
            # append: this payload field's value; without it, the whole payload.
            "field": FIELD_NAME,
            "max_items": {"type": "integer", "minimum": 1, "maximum": MAX_MEMORY_ITEMS},
            # An entry not written for this long (event time) reads as empty and is removed.
            "ttl_s": {"type": "number", "exclusiveMinimum": 0, "maximum": 365 * DAY_S},
            # The output field the list is under.
            "as": FIELD_NAME,
        },
    }

    def state_owner(self, node_id: str, config: JSON) -> str:
        return f"store:{config['store']}" if "store" in config else node_id

    def apply(self, config: JSON, state: NodeState, key: str, t_ms: int, payload: JSON) -> JSON:
        """The payload with the key's list after the operation."""
        entry = state.slots(key).get("")
        items: list[Any] = []
        if entry is not None and t_ms < entry["expires"]:
            items = entry["items"]
        op = config["op"]
        if op == "append":
            item = payload.get(config["field"]) if "field" in config else payload
            size = len(json.dumps(item, default=str))
            if size > MAX_ITEM_BYTES:
                raise PermanentError(
                    f"memory: the item is {size} bytes; the limit is {MAX_ITEM_BYTES}"
                )
            items = [*items, item][-int(config.get("max_items", 50)) :]
            expires = t_ms + round(float(config.get("ttl_s", 7 * DAY_S)) * 1000)
            if entry is not None:
                expires = max(expires, entry["expires"])  # an older event does not shorten it
            state.put(key, "", {"items": items, "expires": expires})
        elif op == "clear":
            items = []
            if entry is not None:
                state.delete(key, "")
        return {**payload, config.get("as", "memory"): items}

    def expire(self, state: NodeState) -> int:
        """Removes the entries the watermark has passed the expiry of; returns how many."""
        watermark = state.watermark_ms
        if watermark is None:
            return 0
        gone = [
            (key, slot) for key, slot, entry in state.entries() if entry["expires"] <= watermark
        ]
        for key, slot in gone:
            state.delete(key, slot)
        return len(gone)
