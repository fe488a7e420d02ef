from enum import StrEnum


class Queue(StrEnum):
    """The Celery queues stages run on. A node picks one with `resources.queue`."""

    CPU = "cpu"
    GPU = "gpu"
