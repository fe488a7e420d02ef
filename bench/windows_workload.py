"""The windows benchmark's workload and what it must give, computed independently of the
platform: keyed records with event times, the window results and late records the rules
give for them, and the comparison of what came out with those.

The rules, per Kafka partition, records in offset order; the watermark starts undefined
and after each record is max(watermark, event time - max delay):
- tumbling (size S, epoch-aligned): the record is late if its window's end + lateness <=
  the watermark, else it counts in (key, start);
- session (gap G): late if t + G + lateness <= the watermark, else [t, t + G) merges with
  every open session of the key it overlaps (open: end + lateness > the watermark);
- a window whose end + lateness <= the watermark is closed: it takes nothing more and is
  emitted once.
"""

import bisect
import json
import random
import time
import zlib
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

PARTITIONS = 4
KEYS = 1000
SIZE_S, GAP_S, LATENESS_S, MAX_DELAY_S = 10, 5, 2, 5
EVENT_RATE = 400  # records per second of event time: ~4 per key per tumbling window
OUT_OF_ORDER_SHARE, LATE_SHARE = 0.05, 0.01
WARMUP = 1000  # no late record before each partition has a watermark well under way
S_MS, G_MS, L_MS, D_MS = (x * 1000 for x in (SIZE_S, GAP_S, LATENESS_S, MAX_DELAY_S))
# Far enough ahead that the closer's watermark passes every window before it.
CLOSE_AHEAD_MS = S_MS + G_MS + L_MS + D_MS + 1000
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Rec:
    idx: int  # the payload's id
    partition: int
    key: str
    ts: int  # event time, epoch ms
    kind: str  # "ok", "out_of_order", "late", "closer"


# (window kind, key, start, end, count); start and end as the platform writes them.
Result = tuple[str, str, str, str, int]

KINDS = ("tumble", "session")


def partition_of(key: str) -> int:
    return zlib.crc32(key.encode()) % PARTITIONS


def closer_key(partition: int) -> str:
    return next(f"closer-{j}" for j in range(1000) if partition_of(f"closer-{j}") == partition)


def plan(count: int, seed: int) -> list[tuple[str, str, int]]:
    """(key, kind, event time offset in ms from the record's nominal time) for each record."""
    rng = random.Random(seed)
    late = set(rng.sample(range(WARMUP, count), round(count * LATE_SHARE)))
    rest = [i for i in range(count) if i not in late]
    out_of_order = set(rng.sample(rest, round(count * OUT_OF_ORDER_SHARE)))
    planned = []
    for i in range(count):
        key = f"k{rng.randrange(KEYS)}"
        if i in late:  # older than the watermark by more than either window allows
            offset = -(D_MS + S_MS + G_MS + L_MS + rng.randint(1000, 10_000))
            planned.append((key, "late", offset))
        elif i in out_of_order:  # behind the newest, but within the max delay
            planned.append((key, "out_of_order", -rng.randint(1, D_MS * 9 // 10)))
        else:
            planned.append((key, "ok", 0))
    return planned


def closers(records: list[Rec]) -> list[Rec]:
    ahead = max(r.ts for r in records) + CLOSE_AHEAD_MS
    n = len(records)
    return [Rec(n + p, p, closer_key(p), ahead, "closer") for p in range(PARTITIONS)]


def workload(count: int, seed: int) -> list[Rec]:
    """Event times advance EVENT_RATE a second from an hour ago, then the closers."""
    base = int(time.time() * 1000) - 3_600_000
    records = [
        Rec(i, partition_of(key), key, base + i * 1000 // EVENT_RATE + offset, kind)
        for i, (key, kind, offset) in enumerate(plan(count, seed))
    ]
    return records + closers(records)


def encode(rec: Rec) -> bytes:
    return json.dumps({"id": rec.idx, "ts": rec.ts, "amount": rec.idx % 100}).encode()


def iso(ms: int) -> str:
    return (EPOCH + timedelta(milliseconds=ms)).isoformat()


@dataclass
class Reference:
    windows: dict[Result, int]  # each result -> the idx of the record that closes it
    late: set[tuple[str, int]]  # (window kind, idx)


def reference(records: list[Rec]) -> Reference:
    """The rules, record by record, each partition in offset (send) order."""
    ref = Reference({}, set())
    for partition in range(PARTITIONS):
        _reference_partition([r for r in records if r.partition == partition], ref)
    planned_late = {(kind, r.idx) for r in records if r.kind == "late" for kind in KINDS}
    if ref.late != planned_late:
        raise RuntimeError("bench bug: the workload's late records are not the late ones")
    return ref


def _reference_partition(recs: list[Rec], ref: Reference) -> None:
    wm = float("-inf")
    marks: list[float] = []  # the watermark after each record
    tumbling: Counter[tuple[str, int]] = Counter()
    sessions: dict[str, list[tuple[int, int, int]]] = {}  # key -> (start, end, count), all
    for r in recs:
        start = r.ts // S_MS * S_MS
        if start + S_MS + L_MS <= wm:
            ref.late.add(("tumble", r.idx))
        else:
            tumbling[(r.key, start)] += 1
        if r.ts + G_MS + L_MS <= wm:
            ref.late.add(("session", r.idx))
        else:
            joined: list[tuple[int, int, int]] = []
            kept: list[tuple[int, int, int]] = []
            for s in sessions.get(r.key, []):
                is_open = s[1] + L_MS > wm
                (joined if is_open and s[0] < r.ts + G_MS and r.ts < s[1] else kept).append(s)
            merged = (
                min([r.ts, *(s[0] for s in joined)]),
                max([r.ts + G_MS, *(s[1] for s in joined)]),
                1 + sum(s[2] for s in joined),
            )
            sessions[r.key] = [*kept, merged]
        wm = max(wm, r.ts - D_MS)
        marks.append(wm)
    found = [("tumble", key, start, start + S_MS, n) for (key, start), n in tumbling.items()]
    found += [("session", key, s, e, n) for key, lst in sessions.items() for s, e, n in lst]
    for kind, key, start, end, count in found:
        if key.startswith("closer-"):
            continue  # the closer's own windows stay open
        closing = bisect.bisect_left(marks, end + L_MS)  # marks never go down
        if closing == len(marks):
            raise RuntimeError(f"bench bug: the closer leaves {kind} {key} {start} open")
        ref.windows[(kind, key, iso(start), iso(end), count)] = recs[closing].idx


class Out(NamedTuple):
    key: str | None
    value: bytes
    timestamp_ms: int


def parse_window(kind: str, out: Out) -> Result | None:
    try:
        p = json.loads(out.value)
        result = (kind, p["key"], p["start"], p["end"], p["count"])
    except (ValueError, TypeError, KeyError):
        return None
    if p.get("early") is not False or out.key != p["key"] or not isinstance(p["count"], int):
        return None
    return result


def late_item(kind: str, out: Out, by_idx: dict[int, Rec]) -> tuple[str, int] | None:
    """(kind, idx) of a late output that is its record's payload unchanged, under its key."""
    try:
        idx = json.loads(out.value)["id"]
        rec = by_idx[idx]
    except (ValueError, TypeError, KeyError):
        return None
    if json.loads(out.value) != json.loads(encode(rec)) or out.key != rec.key:
        return None
    return kind, idx


def check(
    ref: Reference, records: list[Rec], windows: list[list[Out]], late: list[list[Out]]
) -> dict[str, Any]:
    """What came out of the window topics and the late topics (tumbling, then session),
    against the reference: each result must come exactly once."""
    got: Counter[Result] = Counter()
    first: dict[Result, Out] = {}
    unexpected: list[str] = []
    for kind, outs in zip(KINDS, windows, strict=True):
        for out in outs:
            result = parse_window(kind, out)
            if result is None or result not in ref.windows:
                unexpected.append(
                    f"{kind} key={out.key} {out.value[:160].decode(errors='replace')}"
                )
                continue
            got[result] += 1
            first.setdefault(result, out)
    by_idx = {r.idx: r for r in records}
    late_got: Counter[tuple[str, int] | None] = Counter()
    for kind, outs in zip(KINDS, late, strict=True):
        late_got.update(late_item(kind, out, by_idx) for out in outs)
    missing = [r for r in ref.windows if got[r] == 0]
    return {
        "windows_expected": len(ref.windows),
        "windows_correct": sum(1 for r in ref.windows if got[r] == 1),
        "windows_missing": len(missing),
        "windows_duplicates": sum(n - 1 for n in got.values() if n > 1),
        "windows_unexpected": len(unexpected),
        "late_expected": len(ref.late),
        "late_routed": sum(late_got.values()),
        "late_correct": sum(1 for item in ref.late if late_got[item] == 1),
        "first": first,
        "missing": missing,
        "examples": [f"missing {m}" for m in missing[:5]]
        + [f"unexpected {u}" for u in unexpected[:5]],
    }


def diagnose(ref: Reference, records: list[Rec], key: str) -> list[str]:
    """The key's expected windows and its records in order."""
    lines = [f"  expected for {key}: {sorted(r for r in ref.windows if r[1] == key)}"]
    lines += [f"  record {r}" for r in records if r.key == key]
    return lines
