from enum import StrEnum


class Queue(StrEnum):
    """The Celery queues stages run on. A node picks one with `resources.queue`."""

    CPU = "cpu"
    GPU = "gpu"


# The sweeper's own queue, so it is never stuck behind a backlog of steps (Redis transport
# takes turns between a worker's queues). Not a Queue member: no node can run there.
CONTROL_QUEUE = "control"

# What a CPU worker consumes: its stages, and the sweeper.
CPU_WORKER_QUEUES = [Queue.CPU.value, CONTROL_QUEUE]
