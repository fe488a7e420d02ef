"""`Idempotency-Key` on the API's POST endpoints (apps/api/idempotency.py): a repeat gets the
stored reply and writes nothing; another body under the same key is refused; keys are per
tenant; only successful replies are kept; two requests racing with one key do the work once."""

import secrets
import threading
import time
from typing import Any

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import connection, transaction
from django.test import Client

from apps.api.models import IdempotentReply
from apps.runs.models import Event, Run, RunKind, Step
from apps.tenants.context import tenant_context
from apps.tenants.keys import EVENTS_WRITE, RUNS_WRITE
from apps.tenants.models import Tenant
from tests.api.helpers import SCHEMA_SPEC, SPEC, key_client
from tests.conftest import World

PROBLEM = "application/problem+json"


def run_count(tenant: Tenant) -> int:
    return Run.unscoped_all_tenants.filter(tenant=tenant).count()


def key(name: str) -> dict[str, str]:
    return {"Idempotency-Key": name}


def test_repeat_with_same_key_and_body_replays_the_first_reply(world: World) -> None:
    world.graph("alpha", SPEC)
    api = key_client(world, [RUNS_WRITE])
    body = {"graph": "alpha", "input": {"x": 1}}

    first = api.post("/api/runs/", body, headers=key("run-1"))
    again = api.post("/api/runs/", body, headers=key("run-1"))

    assert first.status_code == again.status_code == 201
    assert "Idempotent-Replayed" not in first
    assert again["Idempotent-Replayed"] == "true"
    assert again.json() == first.json()
    assert again["Location"] == first["Location"] == f"/api/runs/{first.json()['id']}/"
    assert run_count(world.acme) == 1
    assert Step.unscoped_all_tenants.filter(tenant=world.acme).count() == 1


def test_without_a_key_each_post_does_the_work(world: World) -> None:
    world.graph("alpha", SPEC)
    api = key_client(world, [RUNS_WRITE])
    body = {"graph": "alpha", "input": {"x": 1}}

    ids = {api.post("/api/runs/", body).json()["id"] for _ in range(2)}

    assert len(ids) == 2
    assert run_count(world.acme) == 2
    assert not IdempotentReply.unscoped_all_tenants.exists()


def test_same_key_with_another_body_is_refused_and_writes_nothing(world: World) -> None:
    world.graph("alpha", SPEC)
    api = key_client(world, [RUNS_WRITE])
    first = api.post("/api/runs/", {"graph": "alpha", "input": {"x": 1}}, headers=key("k"))

    other = api.post("/api/runs/", {"graph": "alpha", "input": {"x": 2}}, headers=key("k"))

    assert first.status_code == 201
    assert other.status_code == 409
    assert other["Content-Type"] == PROBLEM
    problem = other.json()
    assert problem["status"] == 409
    assert "'k'" in problem["detail"] and "different request" in problem["detail"]
    assert "Idempotent-Replayed" not in other
    assert run_count(world.acme) == 1
    assert Run.unscoped_all_tenants.get().input == {"x": 1}


def test_same_key_on_another_endpoint_is_refused(world: World) -> None:
    """What "the same request" means includes the path: a key used to start a run cannot
    then replay that run's reply for a batch job."""
    world.graph("alpha", SPEC)
    api = key_client(world, [RUNS_WRITE])
    body = {"graph": "alpha", "input": {"x": 1}}
    assert api.post("/api/runs/", body, headers=key("shared")).status_code == 201

    job = api.post("/api/jobs/", {"graph": "alpha", "inputs": [{"x": 1}]}, headers=key("shared"))

    assert job.status_code == 409
    assert run_count(world.acme) == 1


def test_same_key_with_other_query_parameters_is_refused(world: World) -> None:
    """A JSON-lines batch carries its parameters in the query string: the same lines sent
    to another graph under the same key are another request, not a replay of the first."""
    world.graph("alpha", SPEC)
    world.graph("beta", SPEC)
    api = key_client(world, [RUNS_WRITE])
    lines = '{"x": 1}\n{"x": 2}\n'

    def submit(graph: str) -> Any:
        return api.client.post(
            f"/api/jobs/?graph={graph}",
            lines,
            content_type="application/x-ndjson",
            headers={**api.headers, **key("lines")},
        )

    first = submit("alpha")
    other = submit("beta")

    assert first.status_code == 202
    assert other.status_code == 409
    assert "Idempotent-Replayed" not in other
    runs = Run.unscoped_all_tenants.filter(tenant=world.acme)
    assert [run.graph_version.graph.slug for run in runs] == ["alpha"]


def test_a_signed_in_upload_with_a_key_is_replayed(world: World) -> None:
    """A browser uploading a JSON-lines file: the session's CSRF check reads the multipart
    form before the view runs, and the key must still work."""
    world.graph("alpha", SPEC)
    browser = Client(enforce_csrf_checks=True)
    assert browser.login(username="operator", password="pw-operator")
    token = secrets.token_hex(16)
    browser.cookies["csrftoken"] = token

    def upload() -> Any:
        lines = SimpleUploadedFile("in.jsonl", b'{"x": 1}\n{"x": 2}\n')
        return browser.post(
            "/api/jobs/",
            {"graph": "alpha", "file": lines},
            headers={"X-CSRFToken": token, **key("upload-1")},
        )

    first = upload()
    again = upload()

    assert first.status_code == again.status_code == 202
    assert again["Idempotent-Replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]
    assert run_count(world.acme) == 1


def test_keys_are_per_tenant(world: World) -> None:
    world.graph("alpha", SPEC)
    world.graph("alpha", SPEC, tenant=world.globex)
    acme = key_client(world, [RUNS_WRITE])
    globex = key_client(world, [RUNS_WRITE], tenant=world.globex)

    mine = acme.post("/api/runs/", {"graph": "alpha", "input": {"x": 1}}, headers=key("same"))
    # Another tenant's use of the key neither replays acme's reply nor conflicts with it,
    # even with another body.
    theirs = globex.post("/api/runs/", {"graph": "alpha", "input": {"x": 2}}, headers=key("same"))

    assert mine.status_code == theirs.status_code == 201
    assert "Idempotent-Replayed" not in theirs
    assert mine.json()["id"] != theirs.json()["id"]
    assert run_count(world.acme) == run_count(world.globex) == 1
    assert Run.unscoped_all_tenants.get(tenant=world.globex).input == {"x": 2}
    # And each tenant's own repeat replays its own reply.
    again = globex.post("/api/runs/", {"graph": "alpha", "input": {"x": 2}}, headers=key("same"))
    assert again["Idempotent-Replayed"] == "true"
    assert again.json()["id"] == theirs.json()["id"]


def test_an_error_reply_is_not_kept_so_a_fixed_retry_goes_through(world: World) -> None:
    world.graph("typed", SCHEMA_SPEC)
    api = key_client(world, [RUNS_WRITE])

    bad = api.post("/api/runs/", {"graph": "typed", "input": {"x": "one"}}, headers=key("k"))
    assert bad.status_code == 400
    assert bad["Content-Type"] == PROBLEM
    assert not IdempotentReply.unscoped_all_tenants.exists()
    assert run_count(world.acme) == 0

    fixed = api.post("/api/runs/", {"graph": "typed", "input": {"x": 1}}, headers=key("k"))

    assert fixed.status_code == 201
    assert "Idempotent-Replayed" not in fixed
    assert run_count(world.acme) == 1


def test_a_404_reply_is_not_kept(world: World) -> None:
    api = key_client(world, [RUNS_WRITE])
    body = {"graph": "later", "input": {"x": 1}}
    assert api.post("/api/runs/", body, headers=key("k")).status_code == 404

    world.graph("later", SPEC)
    retried = api.post("/api/runs/", body, headers=key("k"))

    assert retried.status_code == 201
    assert run_count(world.acme) == 1


def test_bulk_events_replayed_add_no_events(world: World) -> None:
    world.graph("stream", SPEC)
    api = key_client(world, [EVENTS_WRITE])
    body = {"events": [{"payload": {"x": 1}, "key": "a"}, {"payload": {"x": 2}, "key": "b"}]}

    first = api.post("/api/graphs/stream/events/bulk/", body, headers=key("batch-7"))
    again = api.post("/api/graphs/stream/events/bulk/", body, headers=key("batch-7"))

    assert first.status_code == again.status_code == 202
    assert again["Idempotent-Replayed"] == "true"
    assert again.json() == first.json()
    assert first.json()["accepted"] == 2
    events = Event.unscoped_all_tenants.filter(tenant=world.acme, node_id="input")
    assert sorted(e.payload["x"] for e in events) == [1, 2]
    assert Run.unscoped_all_tenants.filter(kind=RunKind.STREAM).count() == 1
    assert Step.unscoped_all_tenants.filter(tenant=world.acme).count() == 2


@pytest.mark.parametrize("bad", ["k" * 256, "tab\tinside"])
def test_a_key_too_long_or_unprintable_is_refused(world: World, bad: str) -> None:
    world.graph("alpha", SPEC)
    api = key_client(world, [RUNS_WRITE])

    response = api.post("/api/runs/", {"graph": "alpha", "input": {"x": 1}}, headers=key(bad))

    assert response.status_code == 400
    assert response["Content-Type"] == PROBLEM
    assert [e["field"] for e in response.json()["errors"]] == ["Idempotency-Key"]
    assert "255" in response.json()["errors"][0]["message"]
    assert run_count(world.acme) == 0


def test_a_key_of_255_characters_is_taken(world: World) -> None:
    world.graph("alpha", SPEC)
    api = key_client(world, [RUNS_WRITE])
    body = {"graph": "alpha", "input": {"x": 1}}

    first = api.post("/api/runs/", body, headers=key("k" * 255))
    again = api.post("/api/runs/", body, headers=key("k" * 255))

    assert first.status_code == again.status_code == 201
    assert again["Idempotent-Replayed"] == "true"
    assert run_count(world.acme) == 1


# -- two requests racing with one key -----------------------------------------------------


def _waiting_on_locks() -> int:
    with connection.cursor() as cursor:
        # pg_locks, not pg_stat_activity: the latter is a snapshot taken once per transaction.
        cursor.execute("SELECT count(DISTINCT pid) FROM pg_locks WHERE NOT granted")
        row = cursor.fetchone()
    assert row is not None
    return int(row[0])


@pytest.mark.django_db(transaction=True)
def test_two_concurrent_requests_with_one_key_create_one_run(world: World) -> None:
    """Both requests are held in flight together: the test locks the run table against
    inserts until both are waiting on a lock (the first on the run insert, the second on the
    first's claim of the key), then lets them go."""
    world.graph("alpha", SPEC)
    api = key_client(world, [RUNS_WRITE])
    body = {"graph": "alpha", "input": {"x": 1}}
    replies: list[Any] = []
    failures: list[BaseException] = []

    def send() -> None:
        try:
            replies.append(
                Client().post(
                    "/api/runs/",
                    body,
                    content_type="application/json",
                    headers={**api.headers, **key("race")},
                )
            )
        except BaseException as error:  # reported by the main thread
            failures.append(error)
        finally:
            connection.close()

    threads = [threading.Thread(target=send) for _ in range(2)]
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute("LOCK TABLE runs_run IN EXCLUSIVE MODE")
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 20
        while _waiting_on_locks() < 2 and time.monotonic() < deadline and not failures:
            time.sleep(0.05)
        both_waited = _waiting_on_locks() >= 2
    for thread in threads:
        thread.join(timeout=30)

    assert not failures
    assert both_waited
    assert sorted(r.status_code for r in replies) == [201, 201]
    assert replies[0].json()["id"] == replies[1].json()["id"]
    assert sorted(r.get("Idempotent-Replayed", "") for r in replies) == ["", "true"]
    with tenant_context(world.acme):
        assert Run.objects.count() == 1
        assert IdempotentReply.objects.get(key="race").status == 201
