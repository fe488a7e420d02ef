"""Property-based tests of the API against its own OpenAPI document, with schemathesis.

The document is fetched from the app (`/api/schema/`) and every operation in it is called
in-process, through Django's WSGI handler, with requests generated from it (valid ones and,
schemathesis's negative mode, invalid ones), under pytest-django's database:

- with a key that has every scope: no answer is a 5xx, and every answer is documented (its
  status code, its content type, its body against the response schema);
- without credentials: every operation answers a documented 401;
- with another tenant's key, aimed at this tenant's objects: nothing of theirs comes back.

Bounded so it stays cheap and reproducible: a fixed number of examples per operation,
`derandomize=True`, no coverage or stateful phase (their cases are many and not bounded by
`max_examples`). The tenant is made once for the module: a graph `g` (SPEC, version 1
deployed), and twice a run and a batch job of it, one pair whose steps were run here (so there
are outputs, lineage and results to answer with) and one still queued (so cancel succeeds).
Each case runs in a savepoint that is rolled back, so every case sees that same state. Two
cases in three are aimed at those objects (path parameters, and the fields of BODY in a body),
or nearly every slug and id would be a 404 and nearly every write a 400.

Not generated or not checked, and why:
- `POST /api/jobs/` with an `application/x-ndjson` body: the document does not list that form
  (only JSON and multipart, which are both generated), so schemathesis cannot build it;
  tests/api/test_pipeline_api.py covers it.
- The 200 of `GET /api/jobs/{job_id}/results/` is JSON lines, documented as a plain string:
  there is no schema to hold it to, so `ndjson_lines` checks each line is an object with the
  documented keys instead.
- `POST /api/runs/{run_id}/replay/` never succeeds here (no run has dead steps): it is held to
  its documented 400/404/409 answers only.
"""

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import hypothesis
import pytest
import schemathesis
from django.core.signals import request_finished, request_started
from django.core.wsgi import get_wsgi_application
from django.db import close_old_connections, transaction
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from apps.api.jobs import JobRequest, submit_job
from apps.api.parsers import JSON_LINES
from apps.api.views.graphs import profile_from
from apps.audit.services import Actor
from apps.graphs.models import GraphVersion
from apps.runs.engine import execute
from apps.runs.models import CLAIMABLE_STEP_STATUSES, Event, Run, RunStatus, Step
from apps.runs.services import start_run
from apps.tenants.api_keys import create_api_key
from apps.tenants.context import tenant_context
from apps.tenants.keys import SCOPES
from apps.tenants.models import Tenant
from tests.api.helpers import SPEC
from tests.conftest import World

APP = get_wsgi_application()
CONFIG = schemathesis.Config.from_dict(
    {
        # The test sends its own `Authorization`; generated credentials would only be refused.
        "generation": {"with-security-parameters": False},
        "phases": {"coverage": {"enabled": False}, "stateful": {"enabled": False}},
    }
)
SCHEMA = schemathesis.openapi.from_wsgi("/api/schema/?format=json", APP, config=CONFIG)

BOUNDED = hypothesis.settings(deadline=None, derandomize=True)
# What an aimed case's body says, where it has the field: the graph, a version of it, a spec
# and inputs that validate, so that writes get past validation to the services.
BODY: dict[str, Any] = {
    "graph": "g",
    "version": 1,
    "spec": SPEC,
    "input": {"x": 1},
    "inputs": [{"x": 1}],
}
# Runs and jobs whose steps ran (outputs, lineage, results), and ones still queued (cancel).
STATES = ("finished", "queued")
LIMIT = 10_000_000  # per minute and per second: high enough that admission never refuses here
# Deployment paths are aimed at ids that exist nowhere, so that they route (a path that does
# not route is Django's 404 before any 401): their success answers are held to their shapes
# in tests/streams/test_deployment_api.py, as stream services' durable transactions cannot
# run inside the savepoint each case runs in here. The dead letter id is long enough never to
# appear by chance in an answer.
NO_DEPLOYMENT = "00000000-0000-4000-8000-00000000d0e5"
NO_DEAD_LETTER = 9_876_543_210_123


def ndjson_lines(
    ctx: schemathesis.CheckContext, response: schemathesis.Response, case: schemathesis.Case
) -> None:
    """A JSON-lines answer: each line an object with the documented keys."""
    if response.status_code != 200 or not response.headers.get("content-type", [""])[0].startswith(
        JSON_LINES
    ):
        return
    for number, line in enumerate(response.content.decode().splitlines(), start=1):
        row = json.loads(line)
        assert isinstance(row, dict) and set(row) == {"item", "node", "event", "output"}, (
            f"line {number} of {case.operation.label} is not a result row: {line!r}"
        )


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    ndjson_lines,
]


@dataclass(frozen=True)
class Objects:
    """Acme's objects that cases are aimed at, a key of acme's and one of globex's (the
    outsider), each with every scope."""

    acme_key: str
    globex_key: str
    # By state: what the path parameters become when a case is aimed at that state.
    aims: dict[str, dict[str, str | int]]

    def aim(self, case: schemathesis.Case, state: str = "finished") -> bool:
        """Points the case's path parameters, and the fields of BODY in its body, at the
        objects in `state`; True when the case then names one of them."""
        case.path_parameters = {
            name: self.aims[state].get(name, value)
            for name, value in (case.path_parameters or {}).items()
        }
        aimed = bool(case.path_parameters)
        if isinstance(case.body, dict):
            case.body = {**case.body, **{k: v for k, v in BODY.items() if k in case.body}}
            aimed = aimed or "graph" in case.body
        return aimed

    @property
    def ids(self) -> set[str]:
        return {str(v) for aim in self.aims.values() for k, v in aim.items() if k.endswith("_id")}


@contextmanager
def wsgi_in_test_transaction() -> Iterator[None]:
    """Django's WSGI handler closes, at the start and end of each request, a connection not in
    autocommit, which would drop the test's transaction; the test client unhooks it likewise."""
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    try:
        yield
    finally:
        request_started.connect(close_old_connections)
        request_finished.connect(close_old_connections)


def bearer(tenant: Tenant, actor: Actor) -> str:
    _, secret = create_api_key(tenant=tenant, name="schemathesis", scopes=SCOPES, actor=actor)
    return f"Bearer {secret}"


def run_steps(run: Run) -> None:
    """Runs the run's steps here, as a worker would (none runs in this test), to the end."""
    while step := Step.objects.filter(run=run, status__in=CLAIMABLE_STEP_STATUSES).first():
        execute(step.id, "schemathesis", own_queue=None)
    run.refresh_from_db()
    assert run.status == RunStatus.SUCCEEDED, run.error


def run_and_job(version: GraphVersion, actor: Actor, *, finished: bool) -> dict[str, str | int]:
    """A run and a batch job; when finished, their steps ran and the run's output event is
    aimed at, else its input event."""
    run = start_run(version=version, payload={"x": 1}, actor=actor)
    request = JobRequest(version=version, inputs=[{"x": 1}], profile=profile_from({"items": 1}))
    job = submit_job(request, actor=actor)
    if finished:
        run_steps(run)
        run_steps(job.run)
    event = Event.objects.filter(run=run).latest("created_at")
    return {
        "slug": "g",
        "number": 1,
        "run_id": str(run.id),
        "event_id": str(event.id),
        "job_id": str(job.id),
        "deployment_id": NO_DEPLOYMENT,
        "dead_letter_id": NO_DEAD_LETTER,
    }


@pytest.fixture(scope="module")
def objects(django_db_setup: None, django_db_blocker: Any) -> Iterator[Objects]:
    """Made once for the module (the world's users, runs and jobs take a while; there are ~70
    tests), in a transaction rolled back after it; each test's own transaction nests inside."""
    with django_db_blocker.unblock(), wsgi_in_test_transaction(), transaction.atomic():
        world = World()
        Tenant.objects.filter(pk__in=[world.acme.pk, world.globex.pk]).update(
            api_requests_per_min=LIMIT, max_events_per_s=LIMIT
        )
        graph = world.graph("g", SPEC)
        with tenant_context(world.acme):
            version = graph.deployed_version
            assert version is not None
            aims = {
                state: run_and_job(version, world.owner, finished=state == "finished")
                for state in STATES
            }
        yield Objects(
            acme_key=bearer(world.acme, world.owner),
            globex_key=bearer(world.globex, world.outsider),
            aims=aims,
        )
        transaction.set_rollback(True)


def call(case: schemathesis.Case, authorization: str | None) -> schemathesis.Response:
    """Sends the case and checks the answer, in a savepoint rolled back after. A 500's
    traceback is in the captured log (django.request)."""
    headers = {"Authorization": authorization} if authorization else {}
    with transaction.atomic():
        try:
            return case.call_and_validate(headers=headers, checks=CHECKS)
        finally:
            transaction.set_rollback(True)


@pytest.mark.django_db
@SCHEMA.parametrize()
@SCHEMA.given(aim=st.sampled_from([None, *STATES]))
@hypothesis.settings(BOUNDED, max_examples=20)
def test_every_answer_is_documented_schemathesis(
    case: schemathesis.Case, aim: str | None, objects: Objects
) -> None:
    if aim is not None:
        objects.aim(case, aim)
    call(case, objects.acme_key)


@pytest.mark.django_db
@SCHEMA.parametrize()
@hypothesis.settings(BOUNDED, max_examples=3)
def test_without_credentials_every_operation_is_401_schemathesis(
    case: schemathesis.Case, objects: Objects
) -> None:
    objects.aim(case)  # so that every path routes to a view
    response = call(case, None)
    assert response.status_code == 401, response.text


@pytest.mark.django_db
@SCHEMA.parametrize()
@hypothesis.settings(BOUNDED, max_examples=5)
def test_another_tenants_key_gets_nothing_of_theirs_schemathesis(
    case: schemathesis.Case, objects: Objects
) -> None:
    names_theirs = objects.aim(case)
    response = call(case, objects.globex_key)
    leaked = [id_ for id_ in objects.ids if id_ in response.text]
    assert not leaked, f"globex's key got acme's {leaked}: {response.text}"
    if names_theirs:
        assert response.status_code >= 400, f"globex's key reached acme's: {response.text}"
