"""Flow control's per-step fields in the API: a run's detail lists the steps it routed to
another model or holds back in the queue (model, route, waiting, priority), and an output's
lineage carries the same fields on each step. The fields are set with a queryset update where
a test needs a routed or waiting step; the run is driven in-process on the simulated engine."""

from typing import Any

from apps.runs.models import Run, Step, StepStatus
from apps.tenants.context import tenant_context
from tests.api.helpers import key_client
from tests.conftest import World
from tests.web.test_pages import LLM_SPEC, run_in_process, start
from tests.web.test_providers_page import queued_llm_step


def step_update(run_id: Any, world: World, node: str, **fields: Any) -> Step:
    with tenant_context(world.acme):
        Step.objects.filter(run_id=run_id, node_id=node).update(**fields)
        return Step.objects.get(run_id=run_id, node_id=node)


def test_run_detail_lists_routed_and_waiting_steps_with_their_fields(world: World) -> None:
    graph = world.graph("asker", LLM_SPEC)
    step = queued_llm_step(world, world.acme, graph)
    api = key_client(world)
    detail = api.get(f"/api/runs/{step.run_id}/").json()
    assert detail["flow"] == {"steps": [], "truncated": False}  # nothing routed or held yet

    waiting = "waiting: default is at its concurrency limit of 2"
    step_update(step.run_id, world, "ask", waiting=waiting, priority=0)
    detail = api.get(f"/api/runs/{step.run_id}/").json()
    assert detail["flow"] == {
        "steps": [
            {
                "id": str(step.id),
                "node": "ask",
                "item": None,
                "status": StepStatus.QUEUED,
                "model": "",
                "route": "",
                "waiting": waiting,
                "priority": "low",
            }
        ],
        "truncated": False,
    }
    # Another tenant's key does not reach the run at all.
    assert (
        key_client(world, tenant=world.globex).get(f"/api/runs/{step.run_id}/").status_code == 404
    )


def test_lineage_steps_carry_model_route_and_priority(world: World) -> None:
    graph = world.graph("asker", LLM_SPEC)
    run: Run = run_in_process(start(world, graph, {"q": "why"}))
    assert run.status == "succeeded", run.error
    route = "served by small (fallback); default passed over: default's breaker is open"
    step_update(run.id, world, "ask", model="small", route=route, priority=2)
    api = key_client(world)

    detail = api.get(f"/api/runs/{run.id}/").json()
    [routed] = detail["flow"]["steps"]
    assert (routed["node"], routed["status"], routed["model"]) == ("ask", "done", "small")
    assert (routed["route"], routed["waiting"], routed["priority"]) == (route, "", "high")

    output = api.get(f"/api/runs/{run.id}/outputs/").json()["results"][0]
    steps = api.get(f"/api/runs/{run.id}/outputs/{output['id']}/lineage/").json()["steps"]
    fields = {s["node"]: (s["model"], s["route"], s["waiting"], s["priority"]) for s in steps}
    assert fields == {
        "in": ("", "", "", "normal"),
        "ask": ("small", route, "", "high"),
        "keep": ("", "", "", "normal"),
    }
