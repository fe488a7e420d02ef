"""How a Kafka record becomes an event (source.kafka's decode), and what the Kafka sink makes
of a payload: every record PostgreSQL or a JSON encoder would refuse later is refused here,
by name, so it becomes a dead letter instead of failing its whole batch."""

from datetime import UTC, datetime

import pytest

from workers.operators.base import PermanentError
from workers.operators.streams import KafkaSink, KafkaSource

SOURCE = KafkaSource()


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (b"not json", "the value is not JSON"),
        (b"[1, 2]", "the value must be a JSON object, got list"),
        (b'{"a": NaN}', "NaN is not a JSON value"),
        (b'{"a": -Infinity}', "-Infinity is not a JSON value"),
        (b'{"a": 1e400}', "number 1e400 is out of range"),
        (b'{"a": "x\\u0000"}', "NUL character"),
        (b'{"\\ud800": 1}', "lone surrogate"),
        (b'{"a": ' + b"[" * 150 + b"]" * 150 + b"}", "nested more than 100 levels"),
        (b'{"a": ' + b"[" * 5000 + b"]" * 5000 + b"}", "maximum recursion depth"),
        (b"\xff\xfe{", "the value is not JSON"),
        (None, "no value (a tombstone)"),
    ],
)
def test_a_record_that_cannot_be_stored_is_refused_by_name(
    value: bytes | None, problem: str
) -> None:
    with pytest.raises(PermanentError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        SOURCE.decode({}, None, value, 0)


def test_escapes_that_can_be_stored_pass() -> None:
    payload, _key, _time = SOURCE.decode({}, None, b'{"a": "\\\\u0000 \\ud83d\\ude00"}', 0)
    assert payload == {"a": "\\u0000 \U0001f600"}


def test_key_and_event_time_come_from_the_record_or_named_fields() -> None:
    payload, key, at = SOURCE.decode({}, b"k\x001", b'{"n": 1}', 1_700_000_000_000)
    assert (payload, key, at) == ({"n": 1}, "k1", datetime.fromtimestamp(1_700_000_000, UTC))
    config = {"key_field": "user", "event_time_field": "at"}
    _payload, key, at = SOURCE.decode(
        config, b"ignored", b'{"user": 7, "at": "2030-01-01T00:00:00"}', 0
    )
    assert (key, at) == ("7", datetime(2030, 1, 1, tzinfo=UTC))
    with pytest.raises(PermanentError, match="field 'at' must be an ISO 8601 time"):
        SOURCE.decode(config, None, b'{"at": "yesterday"}', 0)


def test_the_kafka_sink_keys_by_template_else_by_the_event_key() -> None:
    sink = KafkaSink()
    assert sink.record({"topic": "acme.t", "key": "u{{ n }}"}, {"n": 1}, "ev") == (
        b"u1",
        b'{"n":1}',
    )
    assert sink.record({"topic": "acme.t"}, {"n": 1}, "ev")[0] == b"ev"
    assert sink.record({"topic": "acme.t", "value": "n={{ n }}"}, {"n": 1}) == (None, b"n=1")
