"""Steps back into the stream segment: a window or memory node after an expensive node (count
tickets per category after an LLM classified them).

The step's commit writes a StreamRelay row (apps/runs/engine/settle). The deployment's Kafka
worker produces the rows to the deployment's relay topic, keyed by the node's key so a key's
events meet in one partition, and marks them sent once the broker acknowledged them. It
consumes that topic like a source: a relayed record enters the segment at its node, and the
batch that takes it deletes its row in the same transaction. A row produced twice (a worker
died between the broker's ack and marking it sent) is found gone the second time and
skipped, so each step output reaches its window exactly once.
"""

import json
import logging
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from django.db import connection, transaction

from apps.streams.segment import Record, Segment
from workers import kafka
from workers.operators.base import JSON, PermanentError
from workers.operators.windows import event_key

log = logging.getLogger(__name__)

RELAY_PARTITIONS = 4
BATCH = 1000


def relay_nodes(segment: Segment) -> set[str]:
    """The stateful nodes fed by a node outside the segment (a step)."""
    return {
        edge_target
        for (node_id, _port), targets in segment.targets.items()
        for edge_target in targets
        if edge_target in segment.stateful
        and node_id != segment.source["id"]
        and node_id not in segment.inside
    }


def send_pending(tenant_id: int, graph_id: int, segment: Segment, topic: str) -> int:
    """Produces the deployment's unsent relay rows (any of its runs': a step of the version
    before a redeploy may finish after it) and marks them sent; returns how many."""
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT r.id, r.node_id, r.event, r.key, r.payload, r.event_time"
                " FROM runs_streamrelay r JOIN runs_run run ON run.id = r.run_id"
                " JOIN graphs_graphversion v ON v.id = run.graph_version_id"
                " WHERE r.tenant_id = %s AND v.graph_id = %s AND r.sent_at IS NULL"
                " ORDER BY r.id LIMIT %s FOR UPDATE OF r SKIP LOCKED",
                [tenant_id, graph_id, BATCH],
            )
            rows = cursor.fetchall()
        if not rows:
            return 0
        deliveries = kafka.Deliveries(kafka.shared_producer())
        orphans = []
        for relay_id, node_id, event_id, key, payload, event_time in rows:
            payload = json.loads(payload) if isinstance(payload, str) else payload
            if node_id not in segment.stateful:
                orphans.append(relay_id)  # the deployed version has no such node now
                continue
            value = encode(relay_id, node_id, event_id, key, payload, event_time)
            deliveries.send(topic, value, key=_key(segment, node_id, payload, key), headers=[])
        deliveries.wait()
        with connection.cursor() as cursor:
            cursor.execute(
                "UPDATE runs_streamrelay SET sent_at = now() WHERE id = ANY(%s)",
                [[row[0] for row in rows]],
            )
            if orphans:
                log.warning("relay: %d rows for nodes no longer deployed, dropped", len(orphans))
                cursor.execute("DELETE FROM runs_streamrelay WHERE id = ANY(%s)", [orphans])
    return len(rows)


def _key(segment: Segment, node_id: str, payload: JSON, key: str) -> bytes | None:
    config = segment.nodes[node_id].get("config", {})
    try:
        window_key = event_key(config, payload, key)
    except PermanentError:
        window_key = key  # the node will say what is wrong when it takes the record
    return window_key.encode() if window_key else None


def encode(
    relay_id: int, node_id: str, event_id: UUID, key: str, payload: JSON, event_time: datetime
) -> bytes:
    return json.dumps(
        {
            "relay": relay_id,
            "node": node_id,
            "event": str(event_id),
            "key": key,
            "event_time_ms": int(event_time.timestamp() * 1000),
            "payload": payload,
        },
        separators=(",", ":"),
        default=str,
    ).encode()


def decode(origin: str, value: bytes | None) -> tuple[int, Record]:
    """(relay row id, the record entering its node); PermanentError if it is not ours."""
    try:
        body: dict[str, Any] = json.loads(value or b"")
        event_time = datetime.fromtimestamp(int(body["event_time_ms"]) / 1000, tz=UTC)
        record = Record(
            origin,
            dict(body["payload"]),
            str(body["key"]),
            event_time,
            into=str(body["node"]),
            event_id=UUID(body["event"]),
        )
        return int(body["relay"]), record
    except (ValueError, KeyError, TypeError) as exc:
        raise PermanentError(f"not a relayed record: {exc}") from None


def still_pending(tenant_id: int, ids: list[int]) -> set[int]:
    """The relay rows not yet taken (a copy of a taken one is skipped)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT id FROM runs_streamrelay WHERE tenant_id = %s AND id = ANY(%s)",
            [tenant_id, ids],
        )
        return {row[0] for row in cursor.fetchall()}
