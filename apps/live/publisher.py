"""Writes runs' feeds. One background thread per process takes frames from a queue, so a
step never waits on Redis: token deltas are coalesced per stream, numbered, stored in the
run's Redis stream and published to the channel layer in one script call per run and
batch (feed.APPEND_SCRIPT), then handed to the archive thread, which writes them to
PostgreSQL in batches. No database write per token.

Coalescing: the first delta after a quiet period goes out at once; deltas that follow
within SLUICE_FEED_FRAME_MS wait for the end of that interval and go out together. A step
or run frame first flushes the tokens it follows, so a step's `done` never overtakes its
last tokens.
"""

import atexit
import json
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from django.conf import settings
from django.db import IntegrityError, close_old_connections, connection
from django.db.models import Max
from redis.exceptions import NoScriptError

from apps.live import feed

logger = logging.getLogger(__name__)

DRAIN_MAX = 5000  # items taken from the queue per pass
ARCHIVE_EVERY_S = 0.25
ARCHIVE_BATCH = 2000
ARCHIVE_IDLE_S = 2.0  # the archive's connection is closed after this long without frames


@dataclass
class _Stream:
    """One step attempt's tokens, owned by the publisher thread."""

    tenant_id: int
    run_id: str
    step_id: str
    node: str
    item: int | None
    attempt: int
    offset: int = 0
    parts: list[str] = field(default_factory=list)
    tokens: int = 0
    first_at: float = 0.0
    last_sent: float = float("-inf")
    due: float | None = None

    def frame(self) -> dict[str, Any]:
        text = "".join(self.parts)
        body = {
            "type": "tokens",
            "at": time.time(),
            "step": self.step_id,
            "node": self.node,
            "item": self.item,
            "attempt": self.attempt,
            "offset": self.offset,
            "text": text,
            "tokens": self.tokens,
            "t": self.first_at,
        }
        self.offset += len(text)  # code points, as Python counts them
        self.parts, self.tokens, self.due = [], 0, None
        return body


class TokenStream:
    """The writer's handle on one step attempt's tokens. Thread-safe; never blocks."""

    def __init__(self, publisher: "FeedPublisher", key: tuple[str, str, int]) -> None:
        self._publisher = publisher
        self._key = key

    def write(self, text: str, tokens: int, at: float) -> None:
        if text:
            self._publisher.put(("tokens", self._key, text, tokens, at))

    def close(self) -> None:
        self._publisher.put(("close", self._key))


class _Outbox:
    """Frames of one pass, per run, in the order they were made."""

    def __init__(self) -> None:
        self.runs: dict[str, tuple[int, list[dict[str, Any]]]] = {}
        self.new_runs: list[str] = []

    def add(self, tenant_id: int, run_id: str, body: dict[str, Any]) -> None:
        self.runs.setdefault(run_id, (tenant_id, []))[1].append(body)


class FeedPublisher:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._queue: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._archive = FrameArchive()
        self._append: Any = None  # the script, registered once per process

    # -- called from any thread -------------------------------------------------------

    def stream(
        self, *, tenant_id: int, run_id: UUID | str, step_id: UUID | str, node: str,
        item: int | None, attempt: int,
    ) -> TokenStream:  # fmt: skip
        state = _Stream(tenant_id, str(run_id), str(step_id), node, item, attempt)
        key = (state.run_id, state.step_id, attempt)
        self.put(("open", key, state))
        return TokenStream(self, key)

    def frame(self, tenant_id: int, run_id: UUID | str, body: dict[str, Any]) -> None:
        """A step or run frame: `body` has `type` and its fields; `at` and `seq` are added."""
        self.put(("frame", tenant_id, str(run_id), body))

    def run_started(self, run_id: UUID | str) -> None:
        """Starts a new run's counter at 0, so its first frame needs no seeding query."""
        self.put(("start", str(run_id)))

    def flush(self, timeout: float = 5.0) -> bool:
        """Waits until everything put so far is published and archived (tests, shutdown)."""
        if self._pid != os.getpid():
            return True
        done = threading.Event()
        self.put(("sync", done))
        return done.wait(timeout)

    def put(self, item: tuple[Any, ...]) -> None:
        self._ensure_running()
        self._queue.put(item)

    def _ensure_running(self) -> None:
        if self._pid == os.getpid():
            return
        with self._lock:
            if self._pid == os.getpid():
                return
            # After a fork the parent's threads are gone; start this process's own.
            self._queue = queue.SimpleQueue()
            self._archive.start()
            threading.Thread(target=self._run, name="sluice-feed", daemon=True).start()
            self._pid = os.getpid()
            atexit.register(self.flush, 2.0)

    # -- the publisher thread ----------------------------------------------------------

    def _run(self) -> None:
        streams: dict[tuple[str, str, int], _Stream] = {}
        frame_s = settings.SLUICE_FEED_FRAME_MS / 1000
        while True:
            due = [s.due for s in streams.values() if s.due is not None]
            timeout = max(min(due) - time.monotonic(), 0) if due else None
            try:
                items = [self._queue.get(timeout=timeout)]
            except queue.Empty:
                items = []
            while len(items) < DRAIN_MAX:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            outbox, syncs = _Outbox(), []
            for item in items:
                if item[0] == "sync":
                    syncs.append(item[1])
                else:
                    self._take(item, streams, outbox, frame_s)
            now = time.monotonic()
            for state in streams.values():
                if state.due is not None and state.due <= now:
                    self._emit(state, outbox, now)
            try:
                self._publish(outbox)
            except Exception:
                logger.exception("feed: publishing %d runs' frames failed", len(outbox.runs))
            for done in syncs:
                self._archive.put(("sync", done))

    def _take(
        self,
        item: tuple[Any, ...],
        streams: dict[tuple[str, str, int], _Stream],
        outbox: _Outbox,
        frame_s: float,
    ) -> None:
        kind, now = item[0], time.monotonic()
        if kind == "start":
            outbox.new_runs.append(item[1])
        elif kind == "open":
            streams[item[1]] = item[2]
        elif kind == "tokens":
            state = streams.get(item[1])
            if state is None:
                return
            if not state.parts:
                state.first_at = item[4]
            state.parts.append(item[2])
            state.tokens += item[3]
            if now - state.last_sent >= frame_s:
                self._emit(state, outbox, now)
            elif state.due is None:
                state.due = state.last_sent + frame_s
        elif kind == "close":
            state = streams.pop(item[1], None)
            if state is not None and state.parts:
                self._emit(state, outbox, now)
        elif kind == "frame":
            _, tenant_id, run_id, body = item
            step_id = body.get("step")
            for state in streams.values():
                if state.parts and state.run_id == run_id and step_id in (None, state.step_id):
                    self._emit(state, outbox, now)
            outbox.add(tenant_id, run_id, {"at": time.time(), **body})

    @staticmethod
    def _emit(state: _Stream, outbox: _Outbox, now: float) -> None:
        outbox.add(state.tenant_id, state.run_id, state.frame())
        state.last_sent = now

    def _publish(self, outbox: _Outbox) -> None:
        client = feed.feed_redis()
        if self._append is None:
            self._append = client.register_script(feed.APPEND_SCRIPT)
        append = self._append
        if outbox.new_runs:
            pipe = client.pipeline(transaction=False)
            for run_id in outbox.new_runs:
                pipe.set(feed.counter_key(run_id), 0, nx=True, ex=feed.COUNTER_TTL_S)
            pipe.execute()
        if not outbox.runs:
            return
        # Round robin across tenants: one tenant's many busy runs do not go ahead of
        # another's few in the pipeline, nor in what the web processes hear first.
        runs = _round_robin_by_tenant(outbox.runs)
        bodies = [
            [json.dumps(body, separators=(",", ":")) for body in frames] for *_, frames in runs
        ]
        # EVALSHA by hand: a registered script in a pipeline asks the server whether it has
        # the script (SCRIPT EXISTS, one more round trip) on every execute.
        pipe = client.pipeline(transaction=False)
        for (run_id, tenant_id, _), texts in zip(runs, bodies, strict=True):
            keys = _keys(run_id)
            args = _script_args(tenant_id, run_id)
            pipe.evalsha(append.sha, len(keys), *keys, *args, *texts)
        firsts = pipe.execute(raise_on_error=False)
        for (run_id, tenant_id, frames), texts, first in zip(runs, bodies, firsts, strict=True):
            if isinstance(first, NoScriptError):  # a new or restarted server: load it, once
                args = _script_args(tenant_id, run_id)
                first = append(keys=_keys(run_id), args=[*args, *texts])
            if isinstance(first, Exception):
                logger.error("feed: run %s: %d frames not published: %s", run_id, len(texts), first)
                continue
            if first == -1:
                first = self._seed_and_append(client, append, tenant_id, run_id, texts)
            self._archive.put(
                ("rows", tenant_id, run_id, first, [f["type"] for f in frames], texts)
            )

    @staticmethod
    def _seed_and_append(
        client: Any, append: Any, tenant_id: int, run_id: str, texts: list[str]
    ) -> int:
        """A run's first frames (or the first after its counter expired): start the counter
        at the highest number PostgreSQL holds, so numbers never repeat."""
        from apps.live.models import PrunedFeed, RunFrame

        close_old_connections()
        stored = RunFrame.unscoped_all_tenants.filter(run_id=run_id).aggregate(m=Max("seq"))["m"]
        # A pruned run's frames are gone, but their numbers were given out.
        pruned = PrunedFeed.unscoped_all_tenants.filter(run_id=run_id).values_list(
            "last_seq", flat=True
        )
        highest = max(stored or 0, *pruned)
        connection.close()  # once per run: not worth holding a connection for
        client.set(feed.counter_key(run_id), highest, nx=True, ex=feed.COUNTER_TTL_S)
        args = _script_args(tenant_id, run_id)
        return int(append(keys=_keys(run_id), args=[*args, *texts]))


def _round_robin_by_tenant(
    runs: dict[str, tuple[int, list[dict[str, Any]]]],
) -> list[tuple[str, int, list[dict[str, Any]]]]:
    """(run, tenant, frames) taking one run of each tenant in turn, each tenant's runs in
    the order they came."""
    by_tenant: dict[int, list[tuple[str, int, list[dict[str, Any]]]]] = {}
    for run_id, (tenant_id, frames) in runs.items():
        by_tenant.setdefault(tenant_id, []).append((run_id, tenant_id, frames))
    if len(by_tenant) == 1:
        return next(iter(by_tenant.values()))
    queues = sorted(by_tenant.values(), key=len)
    longest = len(queues[-1])
    return [q[n] for n in range(longest) for q in queues if n < len(q)]


def _keys(run_id: str) -> list[str]:
    return [feed.counter_key(run_id), feed.stream_key(run_id)]


def _script_args(tenant_id: int, run_id: str) -> list[Any]:
    return [
        feed.run_channel(tenant_id, run_id),
        feed.STREAM_TTL_S,
        feed.COUNTER_TTL_S,
        feed.STREAM_MAX_LEN,
    ]


class FrameArchive:
    """Writes published frames to PostgreSQL (RunFrame) in batches, on its own thread."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()

    def start(self) -> None:
        self._queue = queue.SimpleQueue()
        threading.Thread(target=self._run, name="sluice-feed-archive", daemon=True).start()

    def put(self, item: tuple[Any, ...]) -> None:
        self._queue.put(item)

    def _run(self) -> None:
        while True:
            try:
                items = [self._queue.get(timeout=ARCHIVE_IDLE_S)]
            except queue.Empty:
                # Idle: hold no connection (a database may be dropped). Not after every
                # batch: a busy worker would reconnect a few times a second.
                connection.close()
                items = [self._queue.get()]
            until = time.monotonic() + ARCHIVE_EVERY_S
            rows = sum(len(i[5]) for i in items if i[0] == "rows")
            synced = items[0][0] == "sync"
            while rows < ARCHIVE_BATCH and not synced:
                try:
                    item = self._queue.get(timeout=max(until - time.monotonic(), 0))
                except queue.Empty:
                    break
                items.append(item)
                if item[0] == "rows":
                    rows += len(item[5])
                synced = item[0] == "sync"
            try:
                self._write([i for i in items if i[0] == "rows"])
            except Exception:
                logger.exception("feed: archiving %d frames failed", rows)
            if synced and self._queue.empty():
                connection.close()  # someone waits on the archive: maybe to drop its database
            for item in items:
                if item[0] == "sync":
                    item[1].set()

    def _write(self, batches: list[tuple[Any, ...]]) -> None:
        if not batches:
            return
        close_old_connections()
        rows = [
            (tenant_id, run_id, seq, kind, feed.numbered(seq, text))
            for _, tenant_id, run_id, first, kinds, texts in batches
            for seq, kind, text in zip(range(first, first + len(texts)), kinds, texts, strict=True)
        ]
        try:
            _copy_frames(rows)
            return
        except IntegrityError:
            pass  # a frame archived already (a batch sent again), or a run deleted meanwhile
        try:
            _insert_new_frames(rows)
        except IntegrityError:
            # A run deleted while its last frames were in flight: keep the others.
            from apps.runs.models import Run

            runs = {row[1] for row in rows}
            existing = {
                str(run_id)
                for run_id in Run.unscoped_all_tenants.filter(id__in=runs).values_list(
                    "id", flat=True
                )
            }
            _insert_new_frames([row for row in rows if row[1] in existing])


# Frames are written with COPY: at thousands of frames a second, building a RunFrame per
# frame for bulk_create, or Python-side arrays for INSERT ... unnest (20 us of CPU a frame),
# was the archive thread's largest cost, and it shares its process with the engine. COPY
# costs under 1 us a frame. It cannot skip conflicts, so a batch it refuses goes again
# through the INSERT, which can.
COLUMNS = "(tenant_id, run_id, seq, kind, body)"


def _copy_frames(rows: list[tuple[Any, ...]]) -> None:
    from apps.live.models import RunFrame

    table = RunFrame._meta.db_table
    with (
        connection.cursor() as cursor,
        connection.wrap_database_errors,
        cursor.cursor.copy(f"COPY {table} {COLUMNS} FROM STDIN") as copy,
    ):
        for row in rows:
            copy.write_row(row)


def _insert_new_frames(rows: list[tuple[Any, ...]]) -> None:
    from apps.live.models import RunFrame

    if not rows:
        return
    table = RunFrame._meta.db_table
    columns = [list(column) for column in zip(*rows, strict=True)]
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {table} {COLUMNS}"
            " SELECT * FROM unnest(%s::bigint[], %s::uuid[], %s::bigint[], %s::text[], %s::text[])"
            " ON CONFLICT (run_id, seq) DO NOTHING",
            columns,
        )


FEED = FeedPublisher()
