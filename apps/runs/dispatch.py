"""Sending "step S may be ready" messages. Always after commit: a worker must never find a
message for a step it cannot yet see."""

from dataclasses import dataclass
from uuid import UUID

from django.db import transaction

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


def send_now(message: StepMessage) -> None:
    from workers.tasks import execute_step  # the task module imports this one

    execute_step.apply_async(
        args=(message.tenant_id, str(message.step_id)),
        queue=message.queue,
        countdown=message.countdown_s,
        priority=message.priority,
    )


def send_on_commit(messages: list[StepMessage]) -> None:
    for message in messages:
        transaction.on_commit(lambda m=message: send_now(m))  # type: ignore[misc]
