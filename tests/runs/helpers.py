import time

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
    raise AssertionError(f"run {run.id} still {run.status} after {timeout}s ({run.open_steps} open steps)")
