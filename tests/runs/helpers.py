import time
from collections.abc import Callable

from apps.runs.models import Run
from apps.tenants.context import tenant_context


def wait_for_run(run: Run, *, timeout: float = 60.0) -> Run:
    """Polls PostgreSQL until the run leaves queued/running (the workers are other processes)."""
    deadline = time.monotonic() + timeout
    with tenant_context(run.tenant):
        while time.monotonic() < deadline:
            run.refresh_from_db()
            if not run.is_active:
                return run
            time.sleep(0.1)
    raise AssertionError(
        f"run {run.id} still {run.status} after {timeout}s ({run.open_steps} open steps)"
    )


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
