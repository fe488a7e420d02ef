"""What PostgreSQL's jsonb cannot store: a NUL character or a lone UTF-16 surrogate in a
string (both are valid in Python strings and reach it through JSON's \\u escapes). A
payload with one must be refused with a clear error before it reaches a write, where it
would fail the whole statement (a batch of events, a COPY)."""

import json
import re
from typing import Any

_UNSTORABLE = re.compile("[\\x00\\ud800-\\udfff]")
# Only an escape can put these into parsed JSON: a cheap look at the raw text first.
_ESCAPED = re.compile(rb"\\u(0000|[dD][89a-fA-F])")

PROBLEM = "contains a NUL character or a lone surrogate (\\u0000, \\ud800), which cannot be stored"
# Deeper payloads are refused: encoding one again (a JSON column, a Kafka sink) would hit
# Python's recursion limit in the middle of a write.
MAX_DEPTH = 100
TOO_DEEP = f"is nested more than {MAX_DEPTH} levels deep"


def unstorable(value: Any) -> bool:
    """Whether a string anywhere in `value` (keys included) holds what jsonb refuses.
    A loop, not recursion: a payload may nest as deep as the JSON parser allows."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            if _UNSTORABLE.search(item) is not None:
                return True
        elif isinstance(item, dict):
            pending += item.keys()
            pending += item.values()
        elif isinstance(item, list):
            pending += item
    return False


def too_deep(value: Any, raw: bytes | None = None) -> bool:
    """Whether `value` nests objects and arrays more than MAX_DEPTH levels; with its raw
    JSON, a count of brackets answers most payloads without walking them."""
    if raw is not None and raw.count(b"[") + raw.count(b"{") <= MAX_DEPTH:
        return False
    pending = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, dict | list):
            if depth > MAX_DEPTH:
                return True
            children = item.values() if isinstance(item, dict) else item
            pending += [(child, depth + 1) for child in children]
    return False


def loads(raw: bytes | str) -> Any:
    """JSON as PostgreSQL and every JSON encoder take it back: NaN, Infinity and numbers
    beyond a float's range (1e400) raise ValueError, as malformed JSON does; nesting deeper
    than Python's parser goes raises RecursionError."""
    text = raw if isinstance(raw, str) else _text(raw)
    if text.startswith("\ufeff"):
        raise ValueError("unexpected UTF-8 BOM (decode using utf-8-sig)")
    return _DECODER.decode(text)


def _text(raw: bytes) -> str:
    """As json.loads reads bytes: UTF-8, else the encoding its first bytes say."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode(json.detect_encoding(raw))


def _finite(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"number {text} is out of range")
    return value


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def unstorable_json(raw: bytes, parsed: Any) -> bool:
    """unstorable(parsed), looking at the parsed value only when the raw JSON has an escape
    that could have made one."""
    return _ESCAPED.search(raw) is not None and unstorable(parsed)


# One decoder for every call: json.loads with hooks builds a new one each time, a cost per
# Kafka record (bench windows).
_DECODER = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_finite)
