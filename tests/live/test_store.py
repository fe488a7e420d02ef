"""Merging the two stores' answers into one contiguous run of frames."""

from apps.live.store import merge


def test_redis_and_postgres_overlap_into_one_contiguous_run() -> None:
    archived = [(3, "a3"), (4, "a4"), (5, "a5")]
    recent = [(5, "r5"), (6, "r6")]
    assert merge(2, archived, recent) == [(3, "a3"), (4, "a4"), (5, "r5"), (6, "r6")]


def test_frames_at_or_before_the_cursor_are_dropped() -> None:
    assert merge(4, [(3, "a3"), (4, "a4"), (5, "a5")], []) == [(5, "a5")]


def test_a_hole_neither_store_can_fill_is_stepped_over() -> None:
    """Lost with a Redis crash before archiving: followers go on rather than stall."""
    assert merge(0, [(1, "a1")], [(4, "r4"), (5, "r5")]) == [(1, "a1"), (4, "r4"), (5, "r5")]
