"""The state of a deployment's stateful nodes (windows, memory) in one partition, as a Kafka
worker holds it between micro-batches, and its rows in PostgreSQL.

A worker loads a partition's entries, watermark and late counts when it is assigned the
partition, changes them in memory as it runs records, and writes what changed in the batch's
own transaction (checkpoint.commit_batch), with the partition's next offset. A batch that
is refused, or a worker that dies, leaves PostgreSQL as it was: the worker (or the next one)
loads the partition again and reads its records again from the offset that goes with it.

Each record's changes are journalled until it has passed the whole segment: a record that
fails further on is undone, so it is taken whole or not at all.
"""

import json
import time
from collections.abc import Iterator, Sequence
from typing import Any
from uuid import UUID

from django.db import connection

from workers.operators.base import JSON

Entries = dict[str, dict[str, dict[str, JSON]]]  # owner -> key -> slot -> value
_MISSING = object()
_LATE = "\x00late"  # a journal entry's owner for a late count (no owner is named so)


class PartitionState:
    """Entries of every stateful node of one deployment in one partition."""

    def __init__(
        self,
        label: str,
        watermark_ms: int | None,
        late: dict[str, int],
        entries: Entries,
        version: int = 0,
    ) -> None:
        self.label = label  # "<topic>:<partition>"
        # PartitionOffset.state_version this state was loaded at (or last committed).
        self.version = version
        self.watermark_ms = watermark_ms
        self.late = dict(late)
        self.entries = entries
        # Changed since the last commit: written by the next one.
        self.dirty: set[tuple[str, str, str]] = set()
        # The entries PostgreSQL holds: one made and removed between two commits (a window
        # opened and fired in one batch) never goes there at all.
        self.persisted: set[tuple[str, str, str]] = {
            (owner, key, slot)
            for owner, keys in entries.items()
            for key, slots in keys.items()
            for slot in slots
        }
        self._written: tuple[list[tuple[str, str, str]], list[tuple[str, str, str]]] = ([], [])
        # A record's changes so far, to undo it: (owner, key, slot, previous value), or
        # (LATE, node id, "", None) for a late count.
        self._journal: list[tuple[str, str, str, Any]] | None = None
        self._watermark_before: int | None = None
        self._views: dict[str, NodeView] = {}
        # The wall clock of the last record taken (monotonic): idle partitions move on.
        self.last_record_at = time.monotonic()

    def node(self, owner: str) -> "NodeView":
        view = self._views.get(owner)
        if view is None:
            view = self._views[owner] = NodeView(self, owner)
        return view

    # -- one record ------------------------------------------------------------------------

    def begin_record(self) -> None:
        self._journal = []
        self._watermark_before = self.watermark_ms

    def undo_record(self) -> None:
        for owner, key, slot, old in reversed(self._journal or []):
            if owner == _LATE:
                self.late[key] -= 1
            else:
                self._set(owner, key, slot, old)
        self.watermark_ms = self._watermark_before
        self.end_record()

    def end_record(self) -> None:
        self._journal = None

    def count_late(self, node_id: str) -> None:
        self.late[node_id] = self.late.get(node_id, 0) + 1
        if self._journal is not None:
            self._journal.append((_LATE, node_id, "", None))

    def advance(self, watermark_ms: int) -> None:
        """Moves the watermark forward, never back."""
        if self.watermark_ms is None or watermark_ms > self.watermark_ms:
            self.watermark_ms = watermark_ms

    # -- entries -----------------------------------------------------------------------

    def put(self, owner: str, key: str, slot: str, value: JSON) -> None:
        # _remember and _set by hand: this runs for every record a window takes.
        keys = self.entries.get(owner)
        if keys is None:
            keys = self.entries[owner] = {}
        slots = keys.get(key)
        if slots is None:
            slots = keys[key] = {}
        if self._journal is not None:
            self._journal.append((owner, key, slot, slots.get(slot, _MISSING)))
        slots[slot] = value
        self.dirty.add((owner, key, slot))

    def delete(self, owner: str, key: str, slot: str) -> None:
        self._remember(owner, key, slot)
        self._set(owner, key, slot, _MISSING)

    def _remember(self, owner: str, key: str, slot: str) -> None:
        if self._journal is not None:
            old = self.entries.get(owner, {}).get(key, {}).get(slot, _MISSING)
            self._journal.append((owner, key, slot, old))

    def _set(self, owner: str, key: str, slot: str, value: Any) -> None:
        self.dirty.add((owner, key, slot))
        if value is _MISSING:
            slots = self.entries.get(owner, {}).get(key)
            if slots is not None:
                slots.pop(slot, None)
                if not slots:
                    del self.entries[owner][key]
                    if not self.entries[owner]:
                        del self.entries[owner]
            return
        self.entries.setdefault(owner, {}).setdefault(key, {})[slot] = value

    # -- commit --------------------------------------------------------------------------

    def changes(self) -> tuple[list[tuple[str, str, str, JSON]], list[tuple[str, str, str]]]:
        """(entries to write, entries to delete) since the last commit."""
        upserts: list[tuple[str, str, str, JSON]] = []
        deletes: list[tuple[str, str, str]] = []
        for owner, key, slot in self.dirty:
            value = self.entries.get(owner, {}).get(key, {}).get(slot)
            if value is not None:
                upserts.append((owner, key, slot, value))
            elif (owner, key, slot) in self.persisted:
                deletes.append((owner, key, slot))
        self._written = ([(o, k, s) for o, k, s, _v in upserts], deletes)
        return upserts, deletes

    def committed(self) -> None:
        """The last changes() are in PostgreSQL now."""
        written, deleted = self._written
        self.persisted.update(written)
        self.persisted.difference_update(deleted)
        self._written = ([], [])
        self.dirty.clear()
        self.version += 1


class NodeView:
    """One owner's entries in the partition: what a stateful operator sees (NodeState)."""

    def __init__(self, state: PartitionState, owner: str) -> None:
        self.state = state
        self.owner = owner
        self.partition = state.label

    @property
    def watermark_ms(self) -> int | None:
        return self.state.watermark_ms

    def slots(self, key: str) -> dict[str, JSON]:
        return self.state.entries.get(self.owner, {}).get(key, {})

    def put(self, key: str, slot: str, value: JSON) -> None:
        self.state.put(self.owner, key, slot, value)

    def delete(self, key: str, slot: str) -> None:
        self.state.delete(self.owner, key, slot)

    def entries(self) -> Iterator[tuple[str, str, JSON]]:
        """Live, not a copy (fire goes through every open window each batch): change none
        while going through them."""
        for key, slots in self.state.entries.get(self.owner, {}).items():
            for slot, value in slots.items():
                yield key, slot, value


def label(topic: str, partition: int) -> str:
    return f"{topic}:{partition}"


def load(
    deployment_id: UUID, tenant_id: int, partitions: Sequence[tuple[str, int]]
) -> dict[tuple[str, int], PartitionState]:
    """The committed state of these partitions (a partition never read: empty)."""
    labels = {label(topic, partition): (topic, partition) for topic, partition in partitions}
    marks: dict[str, tuple[int | None, dict[str, int], int]] = {}
    entries: dict[str, Entries] = {name: {} for name in labels}
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT topic, partition, watermark_ms, late, state_version"
            " FROM streams_partitionoffset WHERE deployment_id = %s AND tenant_id = %s",
            [deployment_id, tenant_id],
        )
        for topic, partition, watermark_ms, late, version in cursor.fetchall():
            marks[label(topic, partition)] = (watermark_ms, _json(late) or {}, version)
        cursor.execute(
            "SELECT partition, owner, key, slot, value FROM streams_keyedstate"
            " WHERE deployment_id = %s AND tenant_id = %s AND partition = ANY(%s)",
            [deployment_id, tenant_id, list(labels)],
        )
        for name, owner, key, slot, value in cursor.fetchall():
            entries[name].setdefault(owner, {}).setdefault(key, {})[slot] = _json(value)
    states = {}
    for name, tp in labels.items():
        watermark_ms, late, version = marks.get(name, (None, {}, 0))
        states[tp] = PartitionState(name, watermark_ms, late, entries[name], version)
    return states


def write(deployment_id: UUID, tenant_id: int, state: PartitionState) -> None:
    """The partition's changed entries, in the caller's transaction (the batch's). Each
    list goes as one JSON parameter: psycopg adapts a text array element by element in
    Python, a JSON string at once (bench windows)."""
    upserts, deletes = state.changes()
    with connection.cursor() as cursor:
        if deletes:
            cursor.execute(
                "DELETE FROM streams_keyedstate AS s USING jsonb_array_elements(%s::jsonb) AS d"
                " WHERE s.deployment_id = %s AND s.partition = %s AND s.owner = d->>0"
                " AND s.key = d->>1 AND s.slot = d->>2",
                [_dumps(deletes), deployment_id, state.label],
            )
        if upserts:
            cursor.execute(
                "INSERT INTO streams_keyedstate (tenant_id, deployment_id, partition, owner,"
                " key, slot, value, updated_at) SELECT %s, %s, %s, u->>0, u->>1, u->>2, u->3,"
                " now() FROM jsonb_array_elements(%s::jsonb) AS u"
                " ON CONFLICT (deployment_id, owner, partition, key, slot)"
                " DO UPDATE SET value = EXCLUDED.value, updated_at = now()",
                [tenant_id, deployment_id, state.label, _dumps(upserts)],
            )


def _dumps(rows: Sequence[tuple[Any, ...]]) -> str:
    return json.dumps(rows, separators=(",", ":"), default=str)


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value
