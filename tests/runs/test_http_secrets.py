"""`auth_secret` on tool.http and sink.webhook, end to end through the real workers: the
tenant's secret arrives as a bearer token, a missing one fails the step at once with a
message that says where to add it, and the value never lands in a step's error or output,
an effect row or the workers' logs, even when the receiver echoes it back."""

import json
from collections.abc import Iterator
from typing import Any

import pytest

from apps.graphs.validation import validate_spec
from apps.runs.models import Effect, Event, Run, RunStatus, Step, StepStatus
from apps.runs.services import start_run
from apps.tenants.context import tenant_context
from tests.conftest import World
from tests.harness.effect_service import EffectService
from tests.harness.platform import Platform
from tests.runs.helpers import wait_for_run
from tests.secrets.helpers import add_secret

pytestmark = [pytest.mark.workers, pytest.mark.django_db(transaction=True)]

TOKEN = "sk-test-bearer-7f3a9c1e5b"


class AuthRecordingService(EffectService):
    """The effect service, also recording each request's Authorization header. Under
    /echo-auth/<status> it answers that status with the header in the body, as a careless
    API's error page might."""

    def __init__(self) -> None:
        self.authorizations: list[str] = []
        super().__init__()

    def _handler(self) -> Any:
        service = self
        base: Any = super()._handler()

        class Handler(base):
            def do_POST(self) -> None:
                auth = self.headers.get("Authorization", "")
                with service.lock:
                    service.authorizations.append(auth)
                if not self.path.startswith("/echo-auth/"):
                    super().do_POST()
                    return
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                answer = json.dumps({"error": f"bad token {auth}", "you_sent": auth}).encode()
                self.send_response(int(self.path.rsplit("/", 1)[1]))
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

        return Handler


@pytest.fixture
def service() -> Iterator[AuthRecordingService]:
    running = AuthRecordingService()
    with running:
        yield running


def spec(url: str, *, secret: str = "hook-token", webhook: bool = True) -> dict[str, Any]:
    call = {"url": url, "auth_secret": secret}
    nodes: list[dict[str, Any]] = [
        {"id": "in", "type": "source.manual"},
        {"id": "call", "type": "tool.http", "retry": {"max_attempts": 2, "backoff_s": 0.1}},
    ]
    nodes[1]["config"] = call
    edges = [["in", "call"]]
    if webhook:
        nodes.append({"id": "notify", "type": "sink.webhook", "config": call})
        edges.append(["call", "notify"])
    return {"nodes": nodes, "edges": edges}


def run_graph(world: World, slug: str, graph_spec: dict[str, Any]) -> Run:
    world.acme.outbound_allowlist = ["127.0.0.1"]
    world.acme.save(update_fields=["outbound_allowlist"])
    graph = world.graph(slug, graph_spec)
    with tenant_context(world.acme):
        run = start_run(version=graph.live_version(), payload={"order": 7}, actor=world.owner)
    return wait_for_run(run, timeout=60)


def kept_by_the_platform(run: Run) -> str:
    """Everything the run left in the database that a secret could leak into."""
    with tenant_context(run.tenant):
        rows = [
            list(Step.objects.filter(run=run).values("error", "skip_reason")),
            list(Effect.objects.filter(step__run=run).values("result", "error")),
            list(Event.objects.filter(run=run).values("payload")),
            Run.objects.filter(id=run.id).values_list("error", flat=True).get(),
        ]
    return json.dumps(rows, default=str)


def worker_logs(platform: Platform) -> str:
    return "".join(
        platform.log_path(name).read_text(errors="replace")
        for name in ("cpu", "gpu")
        if platform.log_path(name).exists()
    )


def test_the_secret_is_sent_as_a_bearer_token_by_tool_and_webhook(
    world: World, platform: Platform, service: AuthRecordingService
) -> None:
    add_secret(world, "hook-token", TOKEN)
    run = run_graph(world, "auth-ok", spec(service.url + "/ok"))
    assert run.status == RunStatus.SUCCEEDED, run.error
    assert service.authorizations == [f"Bearer {TOKEN}"] * 2
    with tenant_context(world.acme):
        assert Effect.objects.filter(step__run=run, calls=1).count() == 2
    assert TOKEN not in kept_by_the_platform(run)


def test_a_missing_secret_fails_the_step_at_once_naming_it(
    world: World, platform: Platform, service: AuthRecordingService
) -> None:
    add_secret(world, "hook-token", TOKEN, tenant=world.globex)  # another tenant's is no use
    run = run_graph(world, "auth-missing", spec(service.url + "/ok"))
    assert run.status == RunStatus.FAILED
    with tenant_context(world.acme):
        call = Step.objects.get(run=run, node_id="call")
        assert call.status == StepStatus.DEAD and call.attempt == 1  # permanent: no retry
        assert "'hook-token'" in call.error and "Secrets page" in call.error
        assert not Effect.objects.filter(step=call).exists()  # refused before the ledger
    assert service.requests == 0 and service.authorizations == []


def test_a_receiver_echoing_the_token_does_not_leak_it(
    world: World, platform: Platform, service: AuthRecordingService
) -> None:
    add_secret(world, "hook-token", TOKEN)
    echoed = run_graph(world, "auth-echo", spec(service.url + "/echo-auth/200", webhook=False))
    refused = run_graph(world, "auth-refused", spec(service.url + "/echo-auth/401"))
    flaky = run_graph(world, "auth-flaky", spec(service.url + "/echo-auth/503"))
    assert service.authorizations == [f"Bearer {TOKEN}"] * 4  # 200, 401, 503 twice

    assert echoed.status == RunStatus.SUCCEEDED, echoed.error
    with tenant_context(world.acme):
        output = Event.objects.get(producer__run=echoed, node_id="call").payload
    assert output["response"]["you_sent"] == "Bearer ***"

    with tenant_context(world.acme):
        refused_call = Step.objects.get(run=refused, node_id="call")
        flaky_call = Step.objects.get(run=flaky, node_id="call")
    assert refused_call.status == StepStatus.DEAD and refused_call.attempt == 1
    assert "answered 401" in refused_call.error and "Bearer ***" in refused_call.error
    assert flaky_call.status == StepStatus.DEAD and flaky_call.attempt == 2
    assert "answered 503" in flaky_call.error and "Bearer ***" in flaky_call.error

    for run in (echoed, refused, flaky):
        assert TOKEN not in kept_by_the_platform(run)
    logs = worker_logs(platform)
    assert "answered 503" in logs and "Bearer ***" in logs  # the retried failure was logged
    assert TOKEN not in logs


@pytest.mark.parametrize("name", ["Hook", "has space", "", "x" * 65, 7])
def test_a_bad_secret_name_is_refused_when_the_graph_is_saved(name: object) -> None:
    graph_spec = spec("http://example.com/hook")
    graph_spec["nodes"][1]["config"]["auth_secret"] = name
    errors = validate_spec(graph_spec)
    assert errors and all("auth_secret" in str(error) for error in errors), errors
    assert validate_spec(spec("http://example.com/hook")) == []
