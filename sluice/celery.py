"""The Celery app. Workers run `celery -A sluice worker -Q <queue>` (see sluice/processes.py)."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "sluice.settings")

app = Celery("sluice")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks(["workers"], related_name="tasks")


@app.on_after_finalize.connect
def _schedule_sweeper(sender: Celery, **_: object) -> None:
    from django.conf import settings

    from workers.queues import CONTROL_QUEUE
    from workers.tasks import sweep

    sender.add_periodic_task(
        settings.SLUICE_SWEEP_INTERVAL_S,
        sweep.s(),
        name="sweep expired leases and lost messages",
        options={"queue": CONTROL_QUEUE, "expires": settings.SLUICE_SWEEP_INTERVAL_S * 2},
    )
