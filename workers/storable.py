"""What PostgreSQL's jsonb cannot store: a NUL character or a lone UTF-16 surrogate in a
string (both are valid in Python strings and reach it through JSON's \\u escapes). A
payload with one must be refused with a clear error before it reaches a write, where it
would fail the whole statement (a batch of events, a COPY)."""

import re
from typing import Any

_UNSTORABLE = re.compile("[\\x00\\ud800-\\udfff]")
# Only an escape can put these into parsed JSON: a cheap look at the raw text first.
_ESCAPED = re.compile(rb"\\u(0000|[dD][89a-fA-F])")

PROBLEM = "contains a NUL character or a lone surrogate (\\u0000, \\ud800), which cannot be stored"


def unstorable(value: Any) -> bool:
    """Whether a string anywhere in `value` (keys included) holds what jsonb refuses."""
    if isinstance(value, str):
        return _UNSTORABLE.search(value) is not None
    if isinstance(value, dict):
        return any(unstorable(k) or unstorable(v) for k, v in value.items())
    if isinstance(value, list):
        return any(unstorable(item) for item in value)
    return False


def unstorable_json(raw: bytes, parsed: Any) -> bool:
    """unstorable(parsed), looking at the parsed value only when the raw JSON has an escape
    that could have made one."""
    return _ESCAPED.search(raw) is not None and unstorable(parsed)
