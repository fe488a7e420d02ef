"""The fallback behind the control channel: pub/sub delivers at most once, so each
generating process checks the database every WATCHDOG_INTERVAL_S (workers.control) for the
runs it generates for, and its leases. A lost stop message costs a poll, never a zombie."""

import time
from uuid import UUID

from django.db import connection

from apps.runs.engine.leases import KEEPER
from apps.runs.engine.states import stop_signal_for
from apps.runs.models import ACTIVE_RUN_STATUSES, Run
from workers.inference.host import EngineHost, StopSignal


def watch_once(host: EngineHost) -> int:
    """Stops generations whose lease was lost or whose run ended without this process
    hearing of it. One query for every run this process is generating for."""
    running = host.running()
    if not running:
        connection.close()  # idle: hold no database connection
        return 0
    stopped = 0
    for generation in running:
        if KEEPER.lost(UUID(generation.owner.step_id)):
            stopped += generation.stop(StopSignal("lease_lost", time.time()))
    run_ids = {g.owner.run_id for g in running}
    # Infrastructure, not tenant data: the ids come from this process's own generations.
    ended = Run.unscoped_all_tenants.filter(id__in=run_ids).exclude(status__in=ACTIVE_RUN_STATUSES)
    for run_id, status, finished_at in ended.values_list("id", "status", "finished_at"):
        at = finished_at.timestamp() if finished_at else time.time()
        stopped += host.stop_matching(StopSignal(stop_signal_for(status), at), runs={str(run_id)})
    return stopped
