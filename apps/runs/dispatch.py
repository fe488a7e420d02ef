"""Sending "step S may be ready" messages. Always after commit: a worker must never find a
message for a step it cannot yet see."""

from dataclasses import dataclass
from uuid import UUID

from django.db import transaction


@dataclass(frozen=True)
class StepMessage:
    tenant_id: int
    step_id: UUID
    queue: str
    countdown_s: float = 0.0


def send_now(message: StepMessage) -> None:
    from workers.tasks import execute_step  # the task module imports this one

    execute_step.apply_async(
        args=(message.tenant_id, str(message.step_id)),
        queue=message.queue,
        countdown=message.countdown_s,
    )


def send_on_commit(messages: list[StepMessage]) -> None:
    for message in messages:
        transaction.on_commit(lambda m=message: send_now(m))  # type: ignore[misc]
