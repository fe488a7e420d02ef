"""Crash-proof progress under fire: the chaos scenario of tests/runs/test_chaos.py, larger,
with the platform's default lease and sweep interval (not the tests' short ones), so the
recovery time is what a deployment would see.

    python -m bench chaos [--quick]

There is no baseline run: the figures are counts that must be zero, and the recovery time,
a kill to the next attempt of a step the kill interrupted starting.
"""

import json
import statistics
import time
from typing import Any

from bench.stack import beat, services, start_worker
from sluice import processes
from tests.harness.effect_service import EffectService
from workers.queues import CPU_WORKER_QUEUES


def main(*, quick: bool) -> int:
    items, kills = (300, 5) if quick else (2000, 10)
    with services("chaos") as root, beat(root), EffectService(delay_s=0.02) as service:
        from apps.graphs.services import create_graph
        from apps.tenants.context import tenant_context
        from apps.tenants.services import create_tenant
        from tests.harness.chaos import WorkerPool, chaos_spec, run_chaos

        tenant = create_tenant(slug="bench", name="Bench", actor="bench")
        tenant.outbound_allowlist = ["127.0.0.1"]
        tenant.save(update_fields=["outbound_allowlist"])
        with tenant_context(tenant):
            graph = create_graph(
                slug="chaos", name="Chaos", spec=chaos_spec(service.url, items), actor="bench"
            )
        pool = WorkerPool(
            lambda name: start_worker(root, name, CPU_WORKER_QUEUES, [], concurrency=2),
            ["chaos-a", "chaos-b"],
        )
        started = time.monotonic()
        try:
            report = run_chaos(
                graph.live_version(), "bench", service, pool, items=items, kills=kills
            )
        finally:
            processes.stop_all(list(pool.workers.values()))
        run_s = time.monotonic() - started
        from django.conf import settings

        lease_s, sweep_s = settings.SLUICE_STEP_LEASE_S, settings.SLUICE_SWEEP_INTERVAL_S
    recoveries = report.recovery_s
    result: dict[str, Any] = {
        "bench": "chaos",
        "items": items,
        "kills": len(report.kills),
        "lost": report.lost,
        "duplicate_effects": report.duplicate_effects,
        "duplicate_outputs": report.duplicate_outputs,
        "recovery_s_max": round(max(recoveries), 2) if recoveries else None,
        "recovery_s_p50": round(statistics.median(recoveries), 2) if recoveries else None,
        "interrupted_steps": len(recoveries),
        "replays_deduplicated": report.replays_deduplicated,
        "ledger_calls": report.ledger_calls,
        "run_status": report.run_status,
        "run_s": round(run_s, 1),
        "lease_s": lease_s,
        "sweep_interval_s": sweep_s,
    }
    print(f"{items} items, {len(report.kills)} SIGKILLed workers, run {report.run_status}")
    if report.run_error:
        print(f"run error: {report.run_error}")
    for kill in report.kills:
        print(f"  kill {kill.worker:<10} interrupted {len(kill.affected)} running steps")
    print(
        f"lost {report.lost} · duplicate outputs {report.duplicate_outputs}"
        f" · duplicate effects {report.duplicate_effects}"
        f" · replays the service deduplicated {report.replays_deduplicated}"
    )
    print(
        f"recovery (kill to the interrupted step running again): max {result['recovery_s_max']} s,"
        f" p50 {result['recovery_s_p50']} s over {len(recoveries)} steps"
        f" (lease {result['lease_s']} s, sweep every {result['sweep_interval_s']} s)"
    )
    print("RESULT " + json.dumps(result))
    clean = report.lost == report.duplicate_effects == report.duplicate_outputs == 0
    return 0 if clean and report.run_status == "succeeded" else 1
