"""Webhook deployments: a signed POST to /hooks/<deployment id>/ is one record, taken exactly
once; everything else is refused with a 4xx problem and writes nothing."""

import json
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import pytest
from django.contrib.auth.models import User
from django.test import Client

from apps.api.webhooks import sign
from apps.audit.models import AuditEntry
from apps.runs.models import Event, ResultRow
from apps.streams import services, webhooks
from apps.streams.models import DeadLetter, Deployment, WebhookDelivery
from apps.tenants.context import tenant_context
from apps.tenants.models import Tenant
from tests.conftest import World
from tests.harness.streams import TopicReader, create_topics

pytestmark = [pytest.mark.django_db]

TABLE = "hooked"


def hook_spec(**source_config: Any) -> dict[str, Any]:
    config = {"input_schema": {"type": "object", "required": ["id"]}, **source_config}
    return {
        "nodes": [
            {"id": "hook", "type": "source.webhook", "config": config},
            {
                "id": "shape",
                "type": "transform.template",
                "config": {"template": "order {{ id }}", "output": "text"},
            },
            {"id": "store", "type": "sink.table", "config": {"table": TABLE}},
        ],
        "edges": [["hook", "shape"], ["shape", "store"]],
    }


def deploy(
    world: World, slug: str = "hooks", tenant: Tenant | None = None, **config: Any
) -> Deployment:
    tenant = tenant or world.acme
    graph = world.graph(slug, hook_spec(**config), tenant=tenant)
    actor = world.owner if tenant == world.acme else world.outsider
    with tenant_context(tenant):
        return services.deploy(graph=graph, version=graph.live_version(), actor=actor)


def secret_of(deployment: Deployment) -> str:
    with tenant_context(deployment.tenant):
        return webhooks.reveal_secret(Deployment.objects.get(pk=deployment.pk))


def post(client: Client, deployment: Deployment, body: bytes, signature: str | None) -> Any:
    headers = {} if signature is None else {"Sluice-Signature": signature}
    return client.post(
        f"/hooks/{deployment.pk}/", body, content_type="application/json", headers=headers
    )


def signed(secret: str, body: bytes, at: float | None = None) -> str:
    return sign(secret, int(time.time() if at is None else at), body)


def written(tenant: Tenant) -> dict[str, int]:
    """What requests can write, so a refusal can be shown to have written nothing."""
    with tenant_context(tenant):
        return {
            "rows": ResultRow.objects.filter(table=TABLE).count(),
            "deliveries": WebhookDelivery.objects.count(),
            "events": Event.objects.exclude(origin="").count(),
            "dead": DeadLetter.objects.count(),
        }


NOTHING = {"rows": 0, "deliveries": 0, "events": 0, "dead": 0}


def test_signed_request_is_taken_once_and_a_replay_is_refused(world: World) -> None:
    deployment = deploy(world)
    body = json.dumps({"id": "o1", "amount": 3}).encode()
    signature = signed(secret_of(deployment), body)
    client = Client()  # anonymous: the signature is the authentication

    taken = post(client, deployment, body, signature)
    assert taken.status_code == 202, taken.content
    answer = taken.json()
    assert answer["accepted"] is True
    with tenant_context(world.acme):
        rows = list(ResultRow.objects.filter(table=TABLE))
        assert [row.data for row in rows] == [{"id": "o1", "amount": 3, "text": "order o1"}]
        source = Event.objects.get(node_id="hook")
        assert source.origin == f"webhook:{answer['delivery']}" == answer["origin"]
        assert source.payload == {"id": "o1", "amount": 3}
        assert source.run_id == deployment.run_id

    replayed = post(client, deployment, body, signature)
    assert replayed.status_code == 409
    assert replayed["Content-Type"] == "application/problem+json"
    assert replayed.json()["code"] == "already_received"
    assert written(world.acme) == {"rows": 1, "deliveries": 1, "events": 1, "dead": 0}

    # The same body signed again (a new timestamp) is a new request: taken.
    again = post(client, deployment, body, signed(secret_of(deployment), body, time.time() + 1))
    assert again.status_code == 202
    assert written(world.acme)["rows"] == 2


def test_wrong_secret_is_refused(world: World) -> None:
    deployment = deploy(world)
    body = b'{"id": "o1"}'
    response = post(Client(), deployment, body, signed("whsec_not-this-one", body))
    assert response.status_code == 401
    assert response.json()["code"] == "signature_mismatch"
    # A signature over other bytes than those sent fails the same way.
    response = post(Client(), deployment, body, signed(secret_of(deployment), b'{"id": "o2"}'))
    assert response.status_code == 401
    assert written(world.acme) == NOTHING


def test_stale_timestamp_is_refused_by_the_window(world: World) -> None:
    deployment = deploy(world)
    secret = secret_of(deployment)
    body = b'{"id": "o1"}'
    response = post(Client(), deployment, body, signed(secret, body, time.time() - 301))
    assert response.status_code == 401
    assert response.json()["code"] == "stale"
    assert "stale" in response.json()["detail"]

    # With time injected: the window is SLUICE_WEBHOOK_TOLERANCE_S (300 s) either side.
    sent_at = 1_800_000_000
    signature = sign(secret, sent_at, body)
    for offset in (301, -301):
        now = datetime.fromtimestamp(sent_at + offset, tz=UTC)
        result = webhooks.receive(deployment.pk, body, signature, now)
        assert (result.status, result.body["code"]) == (401, "stale")
    assert written(world.acme) == NOTHING
    result = webhooks.receive(
        deployment.pk, body, signature, datetime.fromtimestamp(sent_at + 299, tz=UTC)
    )
    assert result.status == 202
    assert written(world.acme)["rows"] == 1


# (body, signature: None for none, "sign" for a good one, "{now}" for the time now,
# the status, the problem's code)
BAD_REQUESTS: list[tuple[bytes, str | None, int, str]] = [
    (b'{"id": "o1"}', None, 401, "signature_missing"),
    (b'{"id": "o1"}', "v1=00ff", 400, "signature_malformed"),
    (b'{"id": "o1"}', "t=soon,v1=00ff", 400, "signature_malformed"),
    (b'{"id": "o1"}', "t=1,t=2,v1=00ff", 400, "signature_malformed"),
    (b'{"id": "o1"}', "t=\u00b2,v1=00ff", 400, "signature_malformed"),  # a digit, not ASCII
    (b'{"id": "o1"}', "t=" + "9" * 5000 + ",v1=00ff", 400, "signature_malformed"),
    (b'{"id": "o1"}', "t={now}", 400, "signature_malformed"),
    (b'{"id": "o1"}', "t={now},v1=\u00e9\u00e9", 401, "signature_mismatch"),
    (b"not json", "sign", 400, "not_json"),
    (b"\xff\xfe{}", "sign", 400, "not_json"),
    (b'{"id": NaN}', "sign", 400, "not_json"),
    (b"[" * 100_000 + b"]" * 100_000, "sign", 400, "not_json"),
    (b'["o1"]', "sign", 400, "not_object"),
    (b'{"amount": 3}', "sign", 422, "invalid"),  # the input schema requires id
    (b'{"id": "o\\u0000"}', "sign", 422, "unstorable"),  # jsonb holds no NUL
    (b'{"id": "\\udc00"}', "sign", 422, "unstorable"),  # nor a lone surrogate
    (b'{"id": 1e400}', "sign", 400, "not_json"),  # beyond a float
    # Parsed, but too deep to encode again into a JSON column.
    (b'{"id": "o", "x": ' + b"[" * 900 + b"]" * 900 + b"}", "sign", 422, "too_deep"),
    (b'{"id": "' + b"x" * 1_000_001 + b'"}', "sign", 413, "too_large"),
]


def test_bad_requests_get_a_problem_never_a_500(world: World) -> None:
    deployment = deploy(world)
    secret = secret_of(deployment)
    for body, signature, status, code in BAD_REQUESTS:
        if signature == "sign":
            signature = signed(secret, body)
        elif signature is not None:
            signature = signature.replace("{now}", str(int(time.time())))
        response = post(Client(), deployment, body, signature)
        case = f"{body[:40]!r} signed {str(signature)[:40]!r}: {response.content[:300]!r}"
        assert response.status_code == status, case
        assert response["Content-Type"] == "application/problem+json", case
        assert response.json()["code"] == code, case
        assert response.json()["detail"], case
    assert written(world.acme) == NOTHING

    response = Client().get(f"/hooks/{deployment.pk}/")
    assert response.status_code == 405
    assert response["Allow"] == "POST"


def test_a_node_failing_on_the_record_is_422_and_writes_nothing(world: World) -> None:
    graph_spec = hook_spec()
    graph_spec["nodes"][1]["config"]["template"] = "order {{ id }} for {{ customer }}"
    graph = world.graph("strict", graph_spec)
    with tenant_context(world.acme):
        deployment = services.deploy(graph=graph, version=graph.live_version(), actor=world.owner)
    body = b'{"id": "o1"}'
    response = post(Client(), deployment, body, signed(secret_of(deployment), body))
    assert response.status_code == 422
    assert response.json()["code"] == "node_failed"
    assert "shape" in response.json()["detail"] and "customer" in response.json()["detail"]
    assert written(world.acme) == NOTHING


def test_paused_is_409_stopped_and_missing_are_404(world: World) -> None:
    deployment = deploy(world)
    secret = secret_of(deployment)
    body = b'{"id": "o1"}'
    signature = signed(secret, body)
    with tenant_context(world.acme):
        services.pause(deployment, actor=world.owner)
    paused = post(Client(), deployment, body, signature)
    assert (paused.status_code, paused.json()["code"]) == (409, "paused")
    # A wrong signature is refused before the deployment's state is told.
    assert post(Client(), deployment, body, signed("whsec_other", body)).status_code == 401
    assert written(world.acme) == NOTHING

    with tenant_context(world.acme):
        services.resume(deployment, actor=world.owner)
    assert post(Client(), deployment, body, signature).status_code == 202

    with tenant_context(world.acme):
        services.drain(deployment, actor=world.owner)  # a webhook stops at once
    stopped = post(Client(), deployment, body, signed(secret, body, time.time() + 1))
    missing = Client().post(
        "/hooks/6f1c1a52-3c5e-4a57-9e44-0d7a3c0f0f0f/",
        body,
        content_type="application/json",
        headers={"Sluice-Signature": signature},
    )
    assert stopped.status_code == missing.status_code == 404
    assert stopped.json() == missing.json()
    assert written(world.acme)["rows"] == 1


def test_another_tenants_url_refuses_this_tenants_secret(world: World) -> None:
    ours = deploy(world)
    theirs = deploy(world, slug="their-hooks", tenant=world.globex)
    body = b'{"id": "o1"}'
    with_our_secret = signed(secret_of(ours), body)

    refused = post(Client(), theirs, body, with_our_secret)
    assert refused.status_code in (401, 404)
    assert post(Client(), ours, body, signed(secret_of(theirs), body)).status_code == 401
    # Signed in as acme's owner changes nothing: the signature is the authentication.
    client = Client()
    client.force_login(cast(User, world.owner))
    assert post(client, theirs, body, with_our_secret).status_code in (401, 404)
    assert written(world.globex) == NOTHING
    assert written(world.acme) == NOTHING

    # Each URL takes its own deployment's signature, into its own tenant.
    assert post(Client(), theirs, body, signed(secret_of(theirs), body)).status_code == 202
    assert written(world.globex)["rows"] == 1
    assert written(world.acme) == NOTHING


def test_key_and_event_time_come_from_the_fields(world: World) -> None:
    deployment = deploy(world, key_field="id", event_time_field="at")
    secret = secret_of(deployment)
    now = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    body = b'{"id": "o7", "at": "2030-01-02T03:00:00Z"}'
    result = webhooks.receive(deployment.pk, body, sign(secret, int(now.timestamp()), body), now)
    assert result.status == 202
    with tenant_context(world.acme):
        source = Event.objects.get(node_id="hook")
    assert source.key == "o7"
    assert source.event_time == now - timedelta(minutes=4, seconds=5)

    bad = b'{"id": "o8", "at": "yesterday"}'
    result = webhooks.receive(deployment.pk, bad, sign(secret, int(now.timestamp()), bad), now)
    assert result.status == 422
    assert "at" in result.body["detail"]
    assert written(world.acme)["rows"] == 1


def test_rotating_the_secret_retires_the_old_one(world: World) -> None:
    deployment = deploy(world)
    old = secret_of(deployment)
    with tenant_context(world.acme):
        webhooks.rotate_secret(deployment, actor=world.owner)
        entry = AuditEntry.objects.get(action="deployment.rotate_secret")
    new = secret_of(deployment)
    assert new != old and new.startswith("whsec_")
    assert entry.target_id == str(deployment.pk) and entry.actor_id == world.owner.pk
    assert old not in json.dumps([entry.before, entry.after])
    assert new not in json.dumps([entry.before, entry.after])

    body = b'{"id": "o1"}'
    assert post(Client(), deployment, body, signed(old, body)).status_code == 401
    assert post(Client(), deployment, body, signed(new, body)).status_code == 202


def test_a_kafka_sink_is_acknowledged_before_the_answer(world: World, kafka_bootstrap: str) -> None:
    topic = f"acme.hooked-{uuid.uuid4().hex[:8]}"
    create_topics(kafka_bootstrap, [topic], partitions=1)
    spec = hook_spec()
    spec["nodes"].append(
        {"id": "out", "type": "sink.kafka", "config": {"topic": topic, "key": "{{ id }}"}}
    )
    spec["edges"].append(["shape", "out"])
    graph = world.graph("to-kafka", spec)
    with tenant_context(world.acme):
        deployment = services.deploy(graph=graph, version=graph.live_version(), actor=world.owner)
    body = b'{"id": "o1"}'
    signature = signed(secret_of(deployment), body)
    assert post(Client(), deployment, body, signature).status_code == 202
    assert post(Client(), deployment, body, signature).status_code == 409

    reader = TopicReader(kafka_bootstrap, topic)
    try:
        reader.read_until(1, timeout=30)
        reader.read(timeout=1.0)  # a second copy, were there one, would be here by now
    finally:
        reader.close()
    assert [(r.key, json.loads(r.value)) for r in reader.records] == [
        ("o1", {"id": "o1", "text": "order o1"})
    ]
    assert reader.records[0].effect_key.startswith(deployment.id.hex[:12] + ":webhook:")
