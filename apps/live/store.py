"""Reads a run's feed after a sequence number: the Redis stream first (the recent tail,
where a follower usually resumes), PostgreSQL for what Redis no longer holds. Returns
frame JSON texts in seq order, contiguous from `after + 1` as far as they go; a run whose
frames were pruned (apps/live/retention.py) has one summary frame instead."""

import logging
from typing import Any
from uuid import UUID

from asgiref.sync import sync_to_async
from django.db import connection

from apps.live import feed
from apps.live.models import RunFrame
from apps.live.summary import is_summary, pruned_summary

logger = logging.getLogger(__name__)

Frames = list[tuple[int, str]]


def _from_stream(entries: Any) -> Frames:
    return [(feed.seq_of(entry_id), fields[b"f"].decode()) for entry_id, fields in entries]


def _from_archive(run_id: UUID | str, after: int, limit: int) -> Frames:
    # A run pruned after its tenant's retention is its summary alone, whatever frames the
    # sweeper has not deleted yet.
    summary = pruned_summary(run_id, after)
    if summary is not None:
        return summary
    rows = RunFrame.unscoped_all_tenants.filter(run_id=run_id, seq__gt=after).order_by("seq")
    return list(rows.values_list("seq", "body")[:limit])


def _from_archive_on_a_thread(run_id: UUID | str, after: int, limit: int) -> Frames:
    """For the async readers: any executor thread will do, and it keeps no connection
    open afterwards (seen left open through database_sync_to_async under load)."""
    try:
        return _from_archive(run_id, after, limit)
    finally:
        connection.close()


def merge(after: int, archived: Frames, recent: Frames) -> Frames:
    """Contiguous frames from after + 1. A hole that neither store can fill (frames lost
    with a Redis crash before they were archived) is stepped over, with a warning, rather
    than stalling every follower at it."""
    by_seq = dict(archived)
    by_seq.update(recent)
    out: Frames = []
    expected = after + 1
    for seq in sorted(by_seq):
        if seq < expected:
            continue
        if seq > expected:
            logger.warning("feed: frames %d..%d are lost; skipping them", expected, seq - 1)
        out.append((seq, by_seq[seq]))
        expected = seq + 1
    return out


def _tail_is_enough(after: int, oldest: Frames, counter: bytes | None) -> bool:
    """Redis alone answers when its stream still holds frame after + 1 or an older one, or
    when the run's counter says no frame after `after` was ever numbered (a quiet run, a
    follower caught up): then PostgreSQL has none either, and thousands of idle followers
    cost it no query."""
    if counter is not None and int(counter) <= after:
        return True
    return bool(oldest) and oldest[0][0] <= after + 1


def _tail_reads(pipe: Any, run_id: UUID | str, after: int, limit: int) -> Any:
    key = feed.stream_key(run_id)
    pipe.xrange(key, min=f"{after + 1}-0", max="+", count=limit)
    pipe.xrange(key, min="-", max="+", count=1)
    pipe.get(feed.counter_key(run_id))
    return pipe


async def aread_after(run_id: UUID | str, after: int, limit: int) -> Frames:
    pipe = _tail_reads(feed.async_feed_redis().pipeline(transaction=False), run_id, after, limit)
    recent_entries, oldest_entries, counter = await pipe.execute()
    recent, oldest = _from_stream(recent_entries), _from_stream(oldest_entries)
    if _tail_is_enough(after, oldest, counter):
        return recent
    archived = await sync_to_async(_from_archive_on_a_thread, thread_sensitive=False)(
        run_id, after, limit
    )
    if len(archived) == 1 and is_summary(archived[0][1]):
        return archived  # the frames before it were pruned on purpose: no hole to warn of
    return merge(after, archived, recent)[:limit]
