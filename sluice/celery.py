"""The Celery app. Workers run `celery -A sluice worker -Q <queue>` (see sluice/processes.py)."""

import os
from typing import Any

from celery import Celery
from celery.signals import celeryd_after_setup
from django.conf import settings

from workers.inference.registry import inference_queues
from workers.queues import CONTROL_QUEUE, Queue

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "sluice.settings")

app = Celery("sluice")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks(["sluice"], related_name="tasks")


@app.on_after_finalize.connect
def _schedule_sweeper(sender: Celery, **_: object) -> None:
    sender.add_periodic_task(
        settings.SLUICE_SWEEP_INTERVAL_S,
        sender.signature("sluice.sweep"),
        name="sweep expired leases and lost messages",
        options={"queue": CONTROL_QUEUE, "expires": settings.SLUICE_SWEEP_INTERVAL_S * 2},
    )
    # Schedule deployments (apps/streams/schedules.py): ticks are exactly once whatever the
    # number of beats, so this only bounds how late a tick fires.
    poll_s = schedule_poll_s()
    sender.add_periodic_task(
        poll_s,
        sender.signature("sluice.fire_schedules"),
        name="fire due schedule ticks",
        options={"queue": CONTROL_QUEUE, "expires": poll_s * 2},
    )


def schedule_poll_s() -> float:
    return float(settings.SLUICE_SCHEDULE_POLL_S)


@celeryd_after_setup.connect
def _add_model_pools(sender: str, instance: Any, **_: object) -> None:
    """A worker started on the `gpu` queue serves every model pool (`gpu.<model>`) in the
    registry, which is what one machine needs. On a cluster, start one worker per model
    with `-Q gpu.<model>` instead, so each GPU holds one engine."""
    queues = instance.app.amqp.queues
    if Queue.GPU.value in queues.consume_from:
        for name in inference_queues():
            queues.select_add(name)
