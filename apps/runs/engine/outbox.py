"""Sending "step S may be ready" messages. Always after commit: a worker must never find a
message for a step it cannot yet see. Messages go out by task name (sluice/tasks.py defines
the tasks, above every layer), so the engine never imports its own entry points."""

from dataclasses import dataclass
from typing import Any
from uuid import UUID

from django.db import transaction

from sluice.celery import app
from workers.queues import CONTROL_QUEUE

EXECUTE_STEP = "sluice.execute_step"
SEND_STEP_MESSAGES = "sluice.send_step_messages"

# Broker priorities (on Redis, a lower number is served first). A step re-queued because its
# worker died has already waited a whole lease: it goes ahead of the backlog (a fan-out's
# thousands of messages) instead of behind it.
NORMAL_PRIORITY = 3
RECOVERY_PRIORITY = 0


@dataclass(frozen=True)
class StepMessage:
    tenant_id: int
    step_id: UUID
    queue: str
    countdown_s: float = 0.0
    priority: int = NORMAL_PRIORITY


def send_now(message: StepMessage, producer: Any = None) -> None:
    app.send_task(
        EXECUTE_STEP,
        args=(message.tenant_id, str(message.step_id)),
        queue=message.queue,
        countdown=message.countdown_s,
        priority=message.priority,
        producer=producer,
    )


def send_on_commit(messages: list[StepMessage]) -> None:
    for message in messages:
        transaction.on_commit(lambda m=message: send_now(m))  # type: ignore[misc]


# Above this many messages, a request that created them hands the sending to a worker:
# one message on the control queue instead of hundreds of publishes on the web process,
# which is what limits bulk intake (bench/ingest). A lost hand-off is covered like any lost
# message: the sweeper re-sends queued steps gone quiet (SLUICE_REQUEUE_AFTER_S).
HAND_OFF_OVER = 32
# Steps per hand-off message, so several worker processes share a large batch's sending.
HAND_OFF_CHUNK = 100


def hand_off_on_commit(tenant_id: int, messages: list[StepMessage]) -> None:
    if len(messages) <= HAND_OFF_OVER:
        send_on_commit(messages)
        return
    listed = [[str(m.step_id), m.queue] for m in messages]
    for start in range(0, len(listed), HAND_OFF_CHUNK):
        chunk = listed[start : start + HAND_OFF_CHUNK]
        transaction.on_commit(lambda chunk=chunk: _send_hand_off(tenant_id, chunk))  # type: ignore[misc]


def _send_hand_off(tenant_id: int, listed: list[list[str]]) -> None:
    app.send_task(SEND_STEP_MESSAGES, args=(tenant_id, listed), queue=CONTROL_QUEUE)


def send_all(tenant_id: int, listed: list[list[str]]) -> None:
    """What the hand-off task does: one message per step, over one broker connection."""
    with app.producer_or_acquire() as producer:
        for step_id, queue in listed:
            send_now(StepMessage(tenant_id, UUID(step_id), queue), producer)
