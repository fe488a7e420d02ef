"""Durable step latency: a chain of N template steps through Sluice (claim with a lease,
commit outputs + downstream step in one transaction, chained on the same worker)
against N bare Celery hops, interleaved in the same invocation; a fan-out of M items
through a template and a collect against M bare Celery tasks sent by one task; and the
throughput of a 5-node chain of cheap nodes (run back to back, one commit per chain)
against the same 5 no-op tasks as a bare Celery chain, as in bench overhead.

    python -m bench chain [--quick]
"""

import json
import statistics
import time
import uuid
from typing import Any

from bench.overhead import WARM_UP_ITEMS, linear_spec, sluice_then_celery
from bench.stack import services, worker
from workers.queues import CPU_WORKER_QUEUES


def chain_spec(length: int) -> dict[str, Any]:
    nodes: list[dict[str, Any]] = [{"id": "in", "type": "source.manual"}]
    edges = []
    for i in range(length):
        nodes.append(
            {"id": f"t{i}", "type": "transform.template", "config": {"template": "{{ n + 1 }}"}}
        )
        edges.append([nodes[-2]["id"], nodes[-1]["id"]])
    return {"nodes": nodes, "edges": edges}


FANOUT_SPEC = {
    "nodes": [
        {"id": "in", "type": "source.manual"},
        {"id": "split", "type": "fanout.split", "config": {"field": "items", "max_items": 100000}},
        {"id": "t", "type": "transform.template", "config": {"template": "{{ item }}"}},
        {"id": "gather", "type": "collect", "config": {"by": "split"}},
    ],
    "edges": [["in", "split"], ["split", "t"], ["t", "gather"]],
    "policies": {"max_fanout": 100000},
}


def run_seconds(version: Any, payload: dict[str, Any], actor: str) -> float:
    from apps.runs.models import RunStatus
    from apps.runs.services import start_run

    run = start_run(version=version, payload=payload, actor=actor)
    while True:
        run.refresh_from_db()
        if not run.is_active:
            break
        time.sleep(0.01)
    if run.status != RunStatus.SUCCEEDED or run.finished_at is None:
        raise RuntimeError(f"bench run ended {run.status}: {run.error}")
    return (run.finished_at - run.created_at).total_seconds()


def celery_chain_seconds(length: int) -> float:
    import redis
    from django.conf import settings

    from bench.baseline_tasks import hop

    client = redis.Redis.from_url(settings.REDIS_URL)
    key = f"bench:{uuid.uuid4()}"
    started = time.time()
    hop.apply_async(args=(length - 1, key), queue="cpu")
    while (done := client.get(key)) is None:
        time.sleep(0.005)
    return float(done) - started


def celery_fanout_seconds(items: int) -> float:
    import redis
    from django.conf import settings

    from bench.baseline_tasks import fan_out

    client = redis.Redis.from_url(settings.REDIS_URL)
    key = f"bench:{uuid.uuid4()}"
    started = time.time()
    fan_out.apply_async(args=(items, key), queue="cpu")
    while int(client.get(key) or 0) < items:
        time.sleep(0.01)
    return float(client.get(f"{key}:at") or 0) - started


def main(*, quick: bool) -> int:
    length, rounds, items = (20, 5, 200) if quick else (50, 10, 2000)
    chained_rounds, chained_items = (2, 100) if quick else (3, 1000)
    with (
        services("chain") as root,
        worker(root, "cpu", CPU_WORKER_QUEUES, ["--include", "bench.baseline_tasks"]),
    ):
        from apps.graphs.services import create_graph
        from apps.tenants.context import tenant_context
        from apps.tenants.services import create_tenant

        tenant = create_tenant(slug="bench", name="Bench", actor="bench")
        with tenant_context(tenant):
            chain = create_graph(slug="chain", name="Chain", spec=chain_spec(length), actor="bench")
            fanout = create_graph(slug="fanout", name="Fan-out", spec=FANOUT_SPEC, actor="bench")
            sluice_ms, celery_ms = [], []
            run_seconds(chain.live_version(), {"n": 0}, "bench")  # warm-up
            celery_chain_seconds(length)
            for _ in range(rounds):  # interleaved: the machine's noise hits both alike
                sluice_ms.append(
                    run_seconds(chain.live_version(), {"n": 0}, "bench") * 1000 / length
                )
                celery_ms.append(celery_chain_seconds(length) * 1000 / length)
            fan_s = run_seconds(fanout.live_version(), {"items": list(range(items))}, "bench")
            celery_fan_s = celery_fanout_seconds(items)
            chained = create_graph(
                slug="chained", name="Chained", spec=linear_spec(chain=True), actor="bench"
            ).live_version()
            sluice_then_celery(chained, WARM_UP_ITEMS)
            measured = [sluice_then_celery(chained, chained_items) for _ in range(chained_rounds)]
    chained_rate = statistics.median(part.steps_per_s for part, _ in measured)
    chained_celery_rate = statistics.median(rate for _, rate in measured)
    chained_steps = sum(len(part.start_ms) for part, _ in measured) * 5
    result = {
        "bench": "chain",
        "chain_length": length,
        "rounds": rounds,
        "sluice_step_ms_p50": round(statistics.median(sluice_ms), 3),
        "celery_hop_ms_p50": round(statistics.median(celery_ms), 3),
        "sluice_step_ms_max": round(max(sluice_ms), 3),
        "celery_hop_ms_max": round(max(celery_ms), 3),
        "ratio_p50": round(statistics.median(sluice_ms) / statistics.median(celery_ms), 3),
        "fanout_items": items,
        "fanout_items_per_s": round(items / fan_s, 1),
        "celery_fanout_items_per_s": round(items / celery_fan_s, 1),
        "fanout_ratio_vs_celery": round(celery_fan_s / fan_s, 3),
        "chained_items": chained_items,
        "chained_steps_per_s": round(chained_rate, 1),
        "chained_celery_tasks_per_s": round(chained_celery_rate, 1),
        "chained_ratio_vs_celery": round(chained_rate / chained_celery_rate, 3),
        "chained_pg_commits_per_step": round(
            sum(part.commits for part, _ in measured) / chained_steps, 3
        ),
    }
    print(f"{'':24}{'sluice step':>14}{'celery hop':>14}")
    print(
        f"{'p50 ms per step':24}{result['sluice_step_ms_p50']:>14}{result['celery_hop_ms_p50']:>14}"
    )
    print(
        f"{'max ms per step':24}{result['sluice_step_ms_max']:>14}{result['celery_hop_ms_max']:>14}"
    )
    print(
        f"fan-out of {items} items: sluice (template + collect) {result['fanout_items_per_s']}"
        f" items/s, bare celery tasks {result['celery_fanout_items_per_s']} items/s"
    )
    print(
        f"5-node chain of cheap nodes, {chained_items} runs a round: sluice"
        f" {result['chained_steps_per_s']} steps/s, bare celery chains"
        f" {result['chained_celery_tasks_per_s']} tasks/s, ratio"
        f" {result['chained_ratio_vs_celery']}; {result['chained_pg_commits_per_step']}"
        " pg commits per step"
    )
    print("RESULT " + json.dumps(result))
    return 0
