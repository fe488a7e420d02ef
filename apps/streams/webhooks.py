"""A webhook deployment's intake: one signed POST is one record, taken exactly once.

The sender signs as Sluice signs its own outbound webhooks (apps/api/webhooks.py):

    Sluice-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>." + raw body)>

with the deployment's secret (one per deployment, so a signature made for one deployment's
URL fails on any other, another tenant's included). A request is refused, and nothing
written, when the deployment is missing, stopped or not a webhook (404, the same answer as
another tenant's), the signature is missing, malformed or wrong (400, 401), its timestamp
is more than SLUICE_WEBHOOK_TOLERANCE_S from now (401 "stale"), the deployment is paused
(409), the body is not a JSON object of at most 1 MB or fails the source's input schema
(400, 413, 422), or it was taken before (409 "already received": the signature is unique
per deployment, so a captured request replayed inside the window is refused).

A request taken writes, in one transaction, its delivery row, the record's events, rows,
steps and Kafka records (acknowledged before the commit), as a Kafka worker's micro-batch
does for a record it read (apps/streams/checkpoint.py). A record a node fails on is
refused with 422 and writes nothing: the sender has the error, and may send it again once
the graph is fixed.
"""

import json
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import psycopg
from django.conf import settings
from django.db import DataError, connection, transaction

from apps.api.webhooks import SIGNATURE_HEADER, sign, verify
from apps.audit.services import Actor, record
from apps.secrets.crypto import SecretUnreadable, decrypt, encrypt
from apps.streams.checkpoint import produce, write_outcomes
from apps.streams.models import Deployment, DeploymentStatus, SourceKind, WebhookDelivery
from apps.streams.segment import Record, Segment, SegmentError
from apps.streams.services import DeploymentRefused, new_webhook_secret
from apps.tenants.context import current_tenant, tenant_context
from workers import kafka, storable
from workers.operators.base import JSON, PermanentError
from workers.operators.streams import MAX_RECORD_BYTES, parse_time

logger = logging.getLogger(__name__)

__all__ = ["SIGNATURE_HEADER", "WebhookResult", "receive", "reveal_secret", "rotate_secret"]

SECRET_NAME = "webhook secret"
HEADER_FORMAT = "t=<unix seconds>,v1=<hex HMAC-SHA256(secret, '<t>.' + raw body)>"
MAX_KEY_CHARS = 200


@dataclass(frozen=True)
class WebhookResult:
    """The answer to one request: a 2xx and its JSON body, or a 4xx/5xx and the problem's
    `title`, `detail` and `code` (the view sends those as application/problem+json)."""

    status: int
    body: dict[str, Any]

    @property
    def ok(self) -> bool:
        return self.status < 400


class Refused(Exception):
    def __init__(self, status: int, code: str, title: str, detail: str) -> None:
        super().__init__(detail)
        self.result = WebhookResult(status, {"title": title, "detail": detail, "code": code})


def _not_found() -> Refused:
    # Missing, stopped, not a webhook, or another tenant's: one answer for all.
    return Refused(404, "not_found", "Not found", "No webhook deployment has this URL.")


def tolerance_s() -> float:
    return float(settings.SLUICE_WEBHOOK_TOLERANCE_S)


def receive(
    deployment_id: UUID | str, raw_body: bytes, signature_header: str, now: datetime
) -> WebhookResult:
    """Takes one signed request for the deployment, or says why not; never raises for
    anything the sender can get wrong."""
    try:
        deployment = _find(deployment_id)
        with tenant_context(deployment.tenant):
            return _receive(deployment, raw_body, signature_header, now)
    except Refused as refused:
        return refused.result


def _find(deployment_id: UUID | str) -> Deployment:
    # Nobody is signed in here: the tenant is the deployment's, so it is found across
    # tenants first (by an id that is its URL), and everything after runs in its tenant.
    try:
        pk = deployment_id if isinstance(deployment_id, UUID) else UUID(str(deployment_id))
    except ValueError:
        raise _not_found() from None
    deployment = (
        Deployment.unscoped_all_tenants.select_related("tenant", "version")
        .filter(pk=pk, source_kind=SourceKind.WEBHOOK)
        .exclude(status__in=[DeploymentStatus.STOPPED, DeploymentStatus.DRAINING])
        .first()
    )
    if deployment is None:
        raise _not_found()
    return deployment


def _receive(deployment: Deployment, raw_body: bytes, header: str, now: datetime) -> WebhookResult:
    if len(raw_body) > MAX_RECORD_BYTES:
        raise Refused(
            413, "too_large", "Too large", f"The body is {len(raw_body)} bytes; the limit is 1 MB."
        )
    digest = _check_signature(deployment, raw_body, header, now)
    if deployment.status == DeploymentStatus.PAUSED:
        raise _paused()
    segment = _segment(deployment)
    payload = _payload(raw_body)
    key, event_time = _key_and_time(segment, payload, now)
    _check_input(segment, payload)
    try:
        with transaction.atomic(durable=True):
            return _take(deployment.pk, digest, payload, key, event_time)
    except SegmentError as exc:
        raise Refused(422, "node_failed", "Record refused", f"{exc}") from None
    except (kafka.DeliveryFailed, kafka.KafkaUnavailable) as exc:
        logger.warning("webhook deployment %s: Kafka sink failed: %s", deployment.pk, exc)
        raise Refused(
            503,
            "sink_unavailable",
            "Service unavailable",
            "The deployment's Kafka sink did not take the record; nothing was taken: retry.",
        ) from None
    except (DataError, psycopg.DataError) as exc:
        # PostgreSQL refused a value the checks above let through: all of it rolled back.
        # (Events are written with COPY, whose errors psycopg raises unwrapped by Django.)
        raise Refused(
            422, "unstorable", "Record refused", f"the payload cannot be stored: {exc}"
        ) from None


def _check_signature(deployment: Deployment, body: bytes, header: str, now: datetime) -> str:
    """The signature this request must carry (the v1 digest of its timestamp and body),
    once the header proves the sender holds the deployment's secret and is not stale."""
    header = header.strip()
    if not header:
        raise Refused(
            401,
            "signature_missing",
            "Not authenticated",
            f"Sign the request: {SIGNATURE_HEADER}: {HEADER_FORMAT}.",
        )
    fields = [part.strip().partition("=") for part in header.split(",")]
    stamps = [value for name, _, value in fields if name == "t"]
    if len(stamps) != 1 or not (stamps[0].isascii() and stamps[0].isdigit()) or len(stamps[0]) > 12:
        raise _malformed("it needs exactly one t=<unix seconds>")
    if not any(name == "v1" and value for name, _, value in fields):
        raise _malformed("it needs a v1=<hex digest>")
    timestamp = int(stamps[0])
    tolerance = tolerance_s()
    if abs(now.timestamp() - timestamp) > tolerance:
        raise Refused(
            401,
            "stale",
            "Not authenticated",
            f"The signature's timestamp t={timestamp} is stale: more than {tolerance:g} s"
            " from this server's clock. Sign each request when it is sent.",
        )
    try:
        secret = decrypt(deployment.webhook_secret, name=SECRET_NAME)
    except SecretUnreadable:
        logger.error("webhook deployment %s: its secret cannot be decrypted", deployment.pk)
        raise Refused(
            503,
            "secret_unreadable",
            "Service unavailable",
            "This deployment's secret cannot be read; its owner must rotate it.",
        ) from None
    if not verify(secret, header, body, tolerance_s=tolerance, now=now.timestamp()):
        raise Refused(
            401,
            "signature_mismatch",
            "Not authenticated",
            "The signature does not match the body with this deployment's secret.",
        )
    return sign(secret, timestamp, body).partition(",v1=")[2]


def _malformed(problem: str) -> Refused:
    return Refused(
        400,
        "signature_malformed",
        "Bad request",
        f"The {SIGNATURE_HEADER} header is malformed: {problem} ({HEADER_FORMAT}).",
    )


def _paused() -> Refused:
    return Refused(
        409, "paused", "Conflict", "The deployment is paused: resume it, then send again."
    )


def _segment(deployment: Deployment) -> Segment:
    return Segment(deployment.version.spec, scope=deployment.id.hex[:12])


def _payload(body: bytes) -> JSON:
    try:
        payload = storable.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise Refused(400, "not_json", "Bad request", f"The body is not JSON: {exc}.") from None
    if not isinstance(payload, dict):
        raise Refused(
            400,
            "not_object",
            "Bad request",
            f"The body must be a JSON object, got {type(payload).__name__}.",
        )
    if storable.too_deep(payload, body):
        raise Refused(422, "too_deep", "Invalid input", f"The body {storable.TOO_DEEP}.")
    if storable.unstorable(payload):
        raise Refused(
            422, "unstorable", "Invalid input", f"The body {storable.PROBLEM}; remove it."
        )
    return payload


def _key_and_time(segment: Segment, payload: JSON, now: datetime) -> tuple[str, datetime]:
    config = segment.source.get("config", {})
    key = ""
    if "key_field" in config:
        value = payload.get(config["key_field"])
        key = value if isinstance(value, str) else "" if value is None else json.dumps(value)
    if "event_time_field" not in config:
        return key[:MAX_KEY_CHARS], now
    field = config["event_time_field"]
    event_time = parse_time(payload.get(field))
    if event_time is None:
        raise Refused(
            422,
            "invalid",
            "Invalid input",
            f"{field}: must be an ISO 8601 time or epoch milliseconds,"
            f" got {json.dumps(payload.get(field))[:100]}",
        )
    return key[:MAX_KEY_CHARS], event_time


def _check_input(segment: Segment, payload: JSON) -> None:
    try:
        segment.check_input(payload)
    except PermanentError as exc:
        raise Refused(422, "invalid", "Invalid input", str(exc)) from None


def _take(deployment_id: UUID, digest: str, payload: JSON, key: str, at: datetime) -> WebhookResult:
    """In the caller's transaction: the delivery, then the record's outcome."""
    deployment = _locked_running(deployment_id)
    delivery_id = _insert_delivery(deployment, digest)
    if delivery_id is None:
        raise Refused(
            409,
            "already_received",
            "Conflict",
            "This request (the same signature) was already received; it was not taken again.",
        )
    segment = _segment(deployment)
    origin = f"webhook:{delivery_id}"
    try:
        outcome = segment.run(Record(origin, payload, key, at))
    except PermanentError as exc:  # the input schema of a version deployed meanwhile
        raise Refused(422, "invalid", "Invalid input", str(exc)) from None
    if outcome.produce:  # only a graph with a Kafka sink needs the broker
        produce([outcome])
    steps = write_outcomes(deployment.run, segment, [outcome], [], deployment.id)
    return WebhookResult(
        202, {"accepted": True, "delivery": delivery_id, "origin": origin, "steps": steps}
    )


def _locked_running(deployment_id: UUID) -> Deployment:
    """The deployment as it is now, locked against a pause or a redeploy until this commits
    (shared: requests to one deployment do not wait for each other)."""
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT status FROM {Deployment._meta.db_table} WHERE id = %s FOR SHARE",
            [deployment_id],
        )
        row = cursor.fetchone()
    if row is None or row[0] in (DeploymentStatus.STOPPED, DeploymentStatus.DRAINING):
        raise _not_found()
    if row[0] == DeploymentStatus.PAUSED:
        raise _paused()
    return Deployment.objects.select_related("version", "run").get(pk=deployment_id)


def _insert_delivery(deployment: Deployment, digest: str) -> int | None:
    """The delivery's id, or None when this signature was already taken."""
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {WebhookDelivery._meta.db_table}"
            " (tenant_id, deployment_id, signature, received_at) VALUES (%s, %s, %s, now())"
            " ON CONFLICT (deployment_id, signature) DO NOTHING RETURNING id",
            [deployment.tenant_id, deployment.pk, digest],
        )
        row = cursor.fetchone()
    return None if row is None else int(row[0])


def rotate_secret(deployment: Deployment, *, actor: Actor) -> Deployment:
    """A new signing secret for the deployment, in force when this commits: requests signed
    with the old one are refused from then on. Audited (never the secret itself)."""
    with transaction.atomic(durable=True):
        locked = Deployment.objects.select_for_update().get(pk=deployment.pk)
        if locked.source_kind != SourceKind.WEBHOOK:
            raise DeploymentRefused("only a webhook deployment has a signing secret")
        locked.webhook_secret = encrypt(new_webhook_secret())
        locked.save(update_fields=["webhook_secret", "updated_at"])
        record(
            tenant=current_tenant(),
            actor=actor,
            action="deployment.rotate_secret",
            target_type="deployment",
            target_id=locked.id,
            before=None,
            after={"rotated": True},
        )
    return locked


def reveal_secret(deployment: Deployment) -> str:
    """The deployment's signing secret, for its owner's page. Raises DeploymentRefused for
    a deployment that has none, SecretUnreadable when the key changed (rotate it)."""
    if deployment.source_kind != SourceKind.WEBHOOK or not deployment.webhook_secret:
        raise DeploymentRefused("only a webhook deployment has a signing secret")
    return decrypt(deployment.webhook_secret, name=SECRET_NAME)
