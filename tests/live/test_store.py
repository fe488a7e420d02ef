"""Merging the two stores' answers into one contiguous run of frames."""

import pytest

from apps.live.store import merge
from tests.conftest import World


def test_redis_and_postgres_overlap_into_one_contiguous_run() -> None:
    archived = [(3, "a3"), (4, "a4"), (5, "a5")]
    recent = [(5, "r5"), (6, "r6")]
    assert merge(2, archived, recent) == [(3, "a3"), (4, "a4"), (5, "r5"), (6, "r6")]


def test_frames_at_or_before_the_cursor_are_dropped() -> None:
    assert merge(4, [(3, "a3"), (4, "a4"), (5, "a5")], []) == [(5, "a5")]


def test_a_hole_neither_store_can_fill_is_stepped_over() -> None:
    """Lost with a Redis crash before archiving: followers go on rather than stall."""
    assert merge(0, [(1, "a1")], [(4, "r4"), (5, "r5")]) == [(1, "a1"), (4, "r4"), (5, "r5")]


@pytest.mark.django_db(transaction=True)
def test_a_follower_at_the_runs_last_number_costs_postgres_no_query(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run's counter says nothing was numbered after the cursor: Redis answers alone.
    Below the counter, with Redis's tail gone, PostgreSQL is read as before."""
    from asgiref.sync import async_to_sync

    from apps.live import store
    from apps.live.publisher import FEED
    from tests.live.feedkit import forget_redis_tail, publish_tokens, queued_run

    run = queued_run(world)
    FEED.run_started(run.id)
    assert FEED.flush()
    archive_reads: list[int] = []
    real = store._from_archive_on_a_thread

    def counted(run_id: object, after: int, limit: int) -> store.Frames:
        archive_reads.append(after)
        return real(run_id, after, limit)  # type: ignore[arg-type]

    monkeypatch.setattr(store, "_from_archive_on_a_thread", counted)
    assert async_to_sync(store.aread_after)(run.id, 0, 10) == []  # quiet: nothing yet
    publish_tokens(run, ["a ", "b "])
    forget_redis_tail(run.id)
    assert async_to_sync(store.aread_after)(run.id, 2, 10) == []  # caught up
    assert archive_reads == []
    assert [seq for seq, _ in async_to_sync(store.aread_after)(run.id, 0, 10)] == [1, 2]
    assert archive_reads == [0]
