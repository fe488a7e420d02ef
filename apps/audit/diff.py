"""Comparing an audit entry's before and after, key by key, for the admin. Pure functions:
no HTML here (the admin escapes what it renders), no database."""

import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class Change(StrEnum):
    ADDED = "added"
    REMOVED = "removed"
    CHANGED = "changed"
    UNCHANGED = "unchanged"


# The key a before or after that is not a JSON object is shown under.
WHOLE_VALUE = "(value)"


@dataclass(frozen=True)
class KeyDiff:
    key: str
    change: Change
    before: str  # compact JSON, "" when the key is absent
    after: str


def compact(value: Any) -> str:
    """One-line JSON with sorted keys, so equal values always read the same."""
    return json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"), default=str)


def _as_mapping(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, dict):
        return {str(key): item for key, item in value.items()}
    return {WHOLE_VALUE: value}


def diff(before: Any, after: Any) -> list[KeyDiff]:
    """Every key of either side, sorted (jsonb keeps no key order). Values compare as JSON,
    so `1` and `true` differ (as they do in the stored JSON) and key order does not."""
    old, new = _as_mapping(before), _as_mapping(after)
    rows = []
    for key in sorted(old.keys() | new.keys()):
        was = compact(old[key]) if key in old else ""
        now = compact(new[key]) if key in new else ""
        if key not in old:
            change = Change.ADDED
        elif key not in new:
            change = Change.REMOVED
        else:
            change = Change.UNCHANGED if was == now else Change.CHANGED
        rows.append(KeyDiff(key, change, was, now))
    return rows


SIGNS = {Change.ADDED: "+", Change.REMOVED: "-", Change.CHANGED: "~"}


def summary(before: Any, after: Any, *, limit: int = 80) -> str:
    """The keys that differ, signed (+added -removed ~changed), cut to `limit` characters."""
    text = " ".join(
        SIGNS[row.change] + row.key for row in diff(before, after) if row.change in SIGNS
    )
    return text if len(text) <= limit else text[: limit - 1] + "…"
