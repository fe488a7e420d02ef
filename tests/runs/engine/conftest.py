from collections.abc import Iterator
from unittest import mock

import pytest

from apps.live.publisher import FEED
from apps.runs.engine.leases import KEEPER
from apps.runs.engine.outbox import StepMessage


@pytest.fixture(autouse=True)
def sent() -> Iterator[list[StepMessage]]:
    """The step messages the engine sent (after commit), instead of publishing them. In a
    test transaction nothing commits: capture on-commit callbacks to see them
    (django_capture_on_commit_callbacks(execute=True))."""
    messages: list[StepMessage] = []

    def record(message: StepMessage, producer: object = None) -> None:
        messages.append(message)

    with mock.patch("apps.runs.engine.outbox.send_now", side_effect=record):
        yield messages


@pytest.fixture(autouse=True)
def _no_lease_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """No lease-renewal thread: its own connection cannot see the uncommitted rows of a test
    transaction, so a renewal landing mid-step would report the lease lost."""
    monkeypatch.setattr(KEEPER, "hold", lambda step_id, token: None)


@pytest.fixture(autouse=True)
def _feed_off() -> Iterator[None]:
    """Live-feed frames stay here: the feed archives them from its own thread and
    connection, which cannot see a test transaction's rows (and may outlive the test)."""
    with mock.patch.object(FEED, "put"):
        yield
