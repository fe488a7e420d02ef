"""The stream sources (Kafka topics, a webhook, a schedule) and the Kafka sink.

A stream deployment runs its source and the cheap nodes after it on a Kafka worker (or, for a
webhook, in the request; for a schedule, in beat's tick task); these operators say how a
record becomes an event there. As steps (a replayed run) a source passes its input through.
"""

import json
from datetime import UTC, datetime
from typing import Any

from croniter import croniter

from workers import storable
from workers.kafka import EFFECT_HEADER, Deliveries, shared_producer
from workers.operators.base import (
    JSON,
    InputEvent,
    Operator,
    Output,
    PermanentError,
    SpecIssue,
    StepContext,
    StepResult,
    register,
)
from workers.operators.builtin import FIELD_NAME, only_input, template_variables
from workers.operators.templating import render, syntax_error
from workers.storable import unstorable_json

MAX_RECORD_BYTES = 1_000_000
TOPIC = {"type": "string", "minLength": 1, "maxLength": 249}
START_FROM = ("earliest", "latest", "timestamp")


class StreamSource(Operator):
    is_source = True
    cheap = True

    def run(self, ctx: StepContext, inputs: list[InputEvent]) -> StepResult:
        return StepResult(outputs=[Output(only_input(inputs).payload)])


@register
class KafkaSource(StreamSource):
    type_name = "source.kafka"
    description = "Records from the tenant's Kafka topics, read in micro-batches exactly once."
    config_schema = {
        "type": "object",
        "additionalProperties": False,
        "required": ["topics"],
        "properties": {
            "topics": {"type": "array", "minItems": 1, "maxItems": 20, "items": TOPIC},
            "value_format": {"enum": ["json"]},
            # The event key: this payload field, else the record's key.
            "key_field": FIELD_NAME,
            # The event's time: this payload field (ISO 8601, or epoch milliseconds), else
            # the record's timestamp.
            "event_time_field": FIELD_NAME,
            # How late, in event time, records may arrive (watermarks use it).
            "max_delay_s": {"type": "number", "minimum": 0, "maximum": 86400},
            # A partition with no record for this long has its watermark follow the wall
            # clock, so its windows still fire (default 30 s).
            "idle_timeout_s": {"type": "number", "minimum": 0.1, "maximum": 86400},
            "start_from": {"enum": list(START_FROM)},
            "start_timestamp": {"type": "string", "format": "date-time"},
            "input_schema": {"type": "object"},
        },
    }

    def check(
        self, node_id: str, config: JSON, nodes: dict[str, JSON], parents: dict[str, set[str]]
    ) -> list[SpecIssue]:
        if config.get("start_from") == "timestamp" and "start_timestamp" not in config:
            return [SpecIssue("start_timestamp", "is required when start_from is 'timestamp'")]
        if "start_timestamp" in config and parse_time(config["start_timestamp"]) is None:
            return [SpecIssue("start_timestamp", "must be an ISO 8601 date and time")]
        return []

    def decode(
        self, config: JSON, key: bytes | None, value: bytes | None, timestamp_ms: int
    ) -> tuple[JSON, str, datetime]:
        """(payload, key, event time) of one record; PermanentError says what is wrong."""
        if value is None:
            raise PermanentError("the record has no value (a tombstone)")
        if len(value) > MAX_RECORD_BYTES:
            raise PermanentError(f"the record is {len(value)} bytes; the limit is 1 MB")
        try:
            payload = storable.loads(value)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise PermanentError(f"the value is not JSON: {exc}") from None
        if not isinstance(payload, dict):
            raise PermanentError(f"the value must be a JSON object, got {type(payload).__name__}")
        if storable.too_deep(payload, value):
            raise PermanentError(f"the value {storable.TOO_DEEP}")
        if unstorable_json(value, payload):
            raise PermanentError(f"the value {storable.PROBLEM}")
        event_key = key.decode("utf-8", "replace").replace("\x00", "")[:200] if key else ""
        if "key_field" in config:
            event_key = _text(payload.get(config["key_field"]))[:200]
        if "event_time_field" not in config:
            return payload, event_key, datetime.fromtimestamp(max(timestamp_ms, 0) / 1000, tz=UTC)
        field = config["event_time_field"]
        parsed = parse_time(payload.get(field))
        if parsed is None:
            raise PermanentError(
                f"field {field!r} must be an ISO 8601 time or epoch milliseconds,"
                f" got {payload.get(field)!r}"
            )
        return payload, event_key, parsed


@register
class WebhookSource(StreamSource):
    type_name = "source.webhook"
    description = "JSON posted to the deployment's URL, signed with its secret (HMAC-SHA256)."
    config_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "key_field": FIELD_NAME,
            "event_time_field": FIELD_NAME,
            "input_schema": {"type": "object"},
        },
    }


@register
class ScheduleSource(StreamSource):
    type_name = "source.schedule"
    description = "One event per tick of a cron expression (UTC), exactly once per tick."
    config_schema = {
        "type": "object",
        "additionalProperties": False,
        "required": ["cron"],
        "properties": {
            "cron": {"type": "string", "minLength": 9, "maxLength": 100},
            # Merged into each tick's event, beside `tick` (the tick's time).
            "payload": {"type": "object"},
        },
    }

    def check(
        self, node_id: str, config: JSON, nodes: dict[str, JSON], parents: dict[str, set[str]]
    ) -> list[SpecIssue]:
        if not croniter.is_valid(config["cron"]):
            return [SpecIssue("cron", "must be a cron expression such as '*/5 * * * *' (UTC)")]
        return []


@register
class KafkaSink(Operator):
    type_name = "sink.kafka"
    description = "Produces a record to the tenant's Kafka topic, once per event (effect key)."
    # Runs in a stream segment on the Kafka worker, where the micro-batch's records are
    # produced together and acknowledged before the batch commits.
    segment_sink = True
    config_schema = {
        "type": "object",
        "additionalProperties": False,
        "required": ["topic"],
        "properties": {
            "topic": TOPIC,
            # Templates over the payload; without `value`, the payload itself as JSON;
            # without `key`, the event's key (in a stream segment), so per-key order holds.
            "key": {"type": "string", "minLength": 1, "maxLength": 1000},
            "value": {"type": "string", "minLength": 1},
        },
    }

    def check(
        self, node_id: str, config: JSON, nodes: dict[str, JSON], parents: dict[str, set[str]]
    ) -> list[SpecIssue]:
        issues = []
        for field in ("key", "value"):
            if field in config and (problem := syntax_error(config[field])):
                issues.append(SpecIssue(field, problem))
        return issues

    def record(
        self, config: JSON, payload: JSON, event_key: str = ""
    ) -> tuple[bytes | None, bytes]:
        """The (key, value) this payload becomes."""
        templated = "key" in config or "value" in config
        variables = template_variables(payload) if templated else payload
        key = render(config["key"], variables).encode() if "key" in config else None
        if key is None and event_key:
            key = event_key.encode()
        if "value" in config:
            value = render(config["value"], variables).encode()
        else:
            value = json.dumps(payload, separators=(",", ":"), default=str).encode()
        return key, value

    def run(self, ctx: StepContext, inputs: list[InputEvent]) -> StepResult:
        payload = only_input(inputs).payload
        key, value = self.record(ctx.config, payload)
        topic = ctx.config["topic"]

        def produce(effect_key: str) -> JSON:
            deliveries = Deliveries(shared_producer())
            deliveries.send(topic, value, key=key, headers=[(EFFECT_HEADER, effect_key.encode())])
            deliveries.wait()
            _topic, partition, offset = deliveries.acked[0]
            return {"topic": topic, "partition": partition, "offset": offset}

        request = {"topic": topic, "key": key.decode() if key else None, "bytes": len(value)}
        produced = ctx.perform_effect("produce", request, produce)
        return StepResult(outputs=[Output({**payload, "produced": produced})])


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def parse_time(value: Any) -> datetime | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        try:
            return datetime.fromtimestamp(value / 1000, tz=UTC)
        except (OverflowError, OSError, ValueError):
            return None
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            return None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return None
