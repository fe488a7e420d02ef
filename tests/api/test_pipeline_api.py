"""The API end to end on real worker processes: a run's outputs and lineage, a batch job's
progress, results and failed items, a stream deployment's events, replay and cancel."""

import json
from typing import Any

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from apps.runs.models import Run, RunKind, RunStatus
from apps.tenants.context import tenant_context
from tests.api.helpers import SPEC, key_client
from tests.conftest import World
from tests.runs.helpers import wait_for_run, wait_until

pytestmark = [pytest.mark.workers, pytest.mark.django_db(transaction=True)]

WORDS_SPEC: dict[str, Any] = {
    "nodes": [
        {"id": "in", "type": "source.manual"},
        {"id": "split", "type": "fanout.split", "config": {"field": "words"}},
        {"id": "shout", "type": "transform.template", "config": {"template": "{{ item | upper }}"}},
        {"id": "gather", "type": "collect", "config": {"by": "split"}},
        {
            "id": "joined",
            "type": "transform.template",
            "config": {"template": "{{ items | map(attribute='text') | join(',') }}"},
        },
    ],
    "edges": [["in", "split"], ["split", "shout"], ["shout", "gather"], ["gather", "joined"]],
}


def finished(world: World, run_id: str) -> Run:
    with tenant_context(world.acme):
        run = Run.objects.get(id=run_id)
    return wait_for_run(run)


def test_a_run_started_through_the_api_shows_counts_outputs_and_lineage(
    world: World, platform: object
) -> None:
    world.graph("g", SPEC)
    api = key_client(world)
    started = api.post("/api/runs/", {"graph": "g", "input": {"x": 7}})
    assert started.status_code == 201, started.json()
    run_id = started.json()["id"]
    assert finished(world, run_id).status == RunStatus.SUCCEEDED

    detail = api.get(f"/api/runs/{run_id}/").json()
    assert detail["status"] == "succeeded"
    assert [(n["node"], n["counts"]["done"]) for n in detail["nodes"]] == [
        ("in", 1),
        ("t", 1),
        ("s", 1),
    ]
    assert detail["steps"]["done"] == 3 and detail["cost_usd"] == "0.000000"

    outputs = api.get(f"/api/runs/{run_id}/outputs/").json()["results"]
    assert [(o["node"], o["payload"]["text"]) for o in outputs] == [("s", "7")]
    lineage = api.get(f"/api/runs/{run_id}/outputs/{outputs[0]['id']}/lineage/").json()
    assert [e["node"] for e in lineage["events"]] == ["input", "in", "t", "s"]
    assert lineage["events"][0]["payload"] == {"x": 7}
    assert [s["node"] for s in lineage["steps"]] == ["in", "t", "s"]
    assert lineage["truncated"] is False

    by_node = api.get(f"/api/runs/{run_id}/outputs/", node="t").json()["results"]
    assert [o["node"] for o in by_node] == ["t"]
    assert api.get(f"/api/runs/{run_id}/outputs/", node="nope").status_code == 400


def test_a_batch_job_reports_progress_results_by_item_and_failed_items(
    world: World, platform: object
) -> None:
    world.graph("words", WORDS_SPEC)
    api = key_client(world)
    inputs = [{"words": ["a", "b"]}, {"words": "not a list"}, {"words": ["c"]}]
    accepted = api.post("/api/jobs/", {"graph": "words", "inputs": inputs, "pages_per_item": 2})
    assert accepted.status_code == 202, accepted.json()
    job = accepted.json()
    assert accepted["Location"] == f"/api/jobs/{job['id']}/"
    assert job["items"] == 3 and job["estimate"]["steps"]["total"] > 0

    run = finished(world, job["run"]["id"])
    assert run.kind == RunKind.BATCH and run.status == RunStatus.FAILED  # one item failed

    done = api.get(f"/api/jobs/{job['id']}/").json()
    assert done["status"] == "failed"
    assert done["progress"]["fraction"] == 1.0 and done["progress"]["eta_seconds"] == 0.0
    assert [(f["item"], f["node"]) for f in done["failed_items"]] == [(1, "split")]
    assert "must be a list" in done["failed_items"][0]["error"]
    stages = {s["node"]: s["counts"] for s in done["stages"]}
    assert stages["in"]["done"] == 3 and stages["shout"]["done"] == 3
    assert done["actual"]["steps"]["total"] == sum(sum(c.values()) for c in stages.values())
    assert done["actual"]["finished"] is True

    results = api.get(f"/api/jobs/{job['id']}/results/")
    assert results["Content-Type"] == "application/x-ndjson"
    lines = [json.loads(line) for line in results.content.decode().splitlines()]
    assert sorted((line["item"], line["output"]["text"]) for line in lines) == [
        (0, "A,B"),
        (2, "C"),
    ]


def test_results_come_in_pages_linked_by_the_next_header(world: World, platform: object) -> None:
    world.graph("g", SPEC)
    api = key_client(world)
    job = api.post("/api/jobs/", {"graph": "g", "inputs": [{"x": i} for i in range(5)]}).json()
    finished(world, job["run"]["id"])
    items, path = [], f"/api/jobs/{job['id']}/results/?limit=2"
    while path:
        page = api.client.get(path, headers=api.headers)
        items += [json.loads(line)["item"] for line in page.content.decode().splitlines()]
        link = page.get("Link")
        path = link[1 : link.index(">")] if link else ""
    assert sorted(items) == [0, 1, 2, 3, 4]


def test_job_inputs_as_json_lines_or_an_uploaded_file(world: World, platform: object) -> None:
    world.graph("g", SPEC)
    api = key_client(world)
    body = b'{"x": 1}\n\n{"x": 2}\n'
    as_lines = api.client.post(
        "/api/jobs/?graph=g", body, content_type="application/x-ndjson", headers=api.headers
    )
    assert as_lines.status_code == 202, as_lines.json()
    assert as_lines.json()["items"] == 2

    upload = SimpleUploadedFile("inputs.jsonl", body + b'{"x": 3}\n')
    as_file = api.client.post("/api/jobs/", {"graph": "g", "file": upload}, headers=api.headers)
    assert as_file.status_code == 202, as_file.json()
    assert as_file.json()["items"] == 3
    for job in (as_lines.json(), as_file.json()):
        assert finished(world, job["run"]["id"]).status == RunStatus.SUCCEEDED

    bad = api.client.post(
        "/api/jobs/?graph=g",
        b'{"x": 1}\n{oops\n',
        content_type="application/x-ndjson",
        headers=api.headers,
    )
    assert bad.status_code == 400 and "line 2" in bad.json()["detail"]


def test_stream_events_flow_through_one_open_run_until_another_version_takes_over(
    world: World, platform: object
) -> None:
    graph = world.graph("g", SPEC)
    api = key_client(world)
    sent = api.post(
        "/api/graphs/g/events/bulk/",
        {"events": [{"payload": {"x": i}, "key": f"user-{i}"} for i in range(3)]},
    )
    assert sent.status_code == 202, sent.json()
    run_id = sent.json()["run"]
    one = api.post("/api/graphs/g/events/", {"payload": {"x": 9}})
    assert one.json()["run"] == run_id  # the same stream run takes it

    def outputs() -> list[Any]:
        return api.get(f"/api/runs/{run_id}/outputs/").json()["results"]

    wait_until(lambda: len(outputs()) == 4, 30, "four outputs")
    keys = sorted(o["key"] for o in outputs())
    assert keys == ["", "user-0", "user-1", "user-2"]  # the key travels with the event
    with tenant_context(world.acme):
        run = Run.objects.get(id=run_id)
        assert run.kind == RunKind.STREAM and run.is_active and run.open_steps == 1

    # A new deployed version: its first event opens a new stream run; the old one finishes.
    api.post("/api/graphs/g/versions/", {"spec": {**SPEC, "policies": {}}, "deploy": True})
    newer = api.post("/api/graphs/g/events/", {"payload": {"x": 1}}).json()["run"]
    assert newer != run_id
    assert finished(world, run_id).status == RunStatus.SUCCEEDED
    with tenant_context(world.acme):
        assert Run.objects.get(id=newer).graph_version.number == graph.versions.count()

    stopped = api.post(f"/api/runs/{newer}/cancel/")
    assert stopped.status_code == 200 and stopped.json()["status"] == "cancelled"
    again = api.post(f"/api/runs/{newer}/cancel/")
    assert again.status_code == 409 and "already ended" in again.json()["detail"]


def test_replaying_dead_steps_through_the_api(world: World, platform: object) -> None:
    world.graph("words", WORDS_SPEC)
    api = key_client(world)
    started = api.post("/api/runs/", {"graph": "words", "input": {"words": "nope"}}).json()
    assert finished(world, started["id"]).status == RunStatus.FAILED
    replayed = api.post(f"/api/runs/{started['id']}/replay/")
    assert replayed.status_code == 200, replayed.json()
    assert replayed.json()["replayed"] == 1
    # The input is still bad: the step dies again, the run fails again (replay set the run
    # running in its own transaction, so waiting for it to end waits for the new attempt).
    assert finished(world, started["id"]).status == RunStatus.FAILED
    nothing = api.post(f"/api/runs/{started['id']}/replay/", {"steps": []})
    assert nothing.status_code == 409


def test_a_large_batch_hands_its_messages_to_a_worker_and_every_item_runs(
    world: World, platform: object
) -> None:
    """Over HAND_OFF_OVER steps, the request sends one control message and a worker sends
    the step messages; every item still runs, exactly once."""
    world.graph("g", SPEC)
    api = key_client(world)
    job = api.post("/api/jobs/", {"graph": "g", "inputs": [{"x": i} for i in range(60)]}).json()
    assert finished(world, job["run"]["id"]).status == RunStatus.SUCCEEDED
    lines = api.get(f"/api/jobs/{job['id']}/results/", limit=200).content.decode().splitlines()
    assert sorted(json.loads(line)["item"] for line in lines) == list(range(60))
