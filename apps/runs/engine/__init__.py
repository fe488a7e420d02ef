"""The step engine (DESIGN "A step's life", "Two executors, one graph"): the one home of a
step's life, from its message to its commit. Its public face is below; everything else in
the package is its own business. store.py is the only writer of step, run and fan-in rows.
"""

from apps.runs.engine.enqueue import enqueue, release_hold, start_at_once
from apps.runs.engine.execute import execute, run_claimed
from apps.runs.engine.stop import stop_run
from apps.runs.engine.sweeper import sweep

__all__ = [
    "enqueue",
    "execute",
    "release_hold",
    "run_claimed",
    "start_at_once",
    "stop_run",
    "sweep",
]
