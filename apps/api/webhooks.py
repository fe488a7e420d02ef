"""The batch job's completion webhook: one signed POST per job once its run has ended,
retried with backoff until a 2xx or the attempts run out.

What a receiver gets:

    POST <webhook_url>
    Content-Type: application/json
    Sluice-Webhook-Id: <job id>            the same on every attempt: deduplicate on it
    Idempotency-Key: batch-job-<job id>
    Sluice-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>." + raw body)>

    {"type": "batch_job.finished", "job": ..., "run": ..., "status": ..., "items": ...,
     "finished_at": ..., "error": ..., "results": "/api/jobs/<id>/results/"}

To check it, recompute the HMAC over the raw body bytes (not re-serialized JSON), compare in
constant time, and refuse a timestamp more than a few minutes from your clock, so a captured
request cannot be replayed later; `verify` below does exactly that and can be copied. Each
attempt is signed afresh, so a retry carries a current timestamp.

Retries: any answer but a 2xx (4xx included: receivers misconfigure, then fix it), a timeout
or a refused connection is tried again after SLUICE_WEBHOOK_BACKOFF_S doubling per attempt,
with jitter, up to 10 minutes, or later if a 429 or 503 asks so with Retry-After. After
SLUICE_WEBHOOK_MAX_ATTEMPTS, or at once when the URL is refused (bad form, or a private
address the tenant's outbound allowlist does not name), the job's webhook is `failed`.

Delivery is at least once: a worker lost mid-request leaves the outcome unknown and the job
is sent again once its claim lapses. Neither the secret nor the signature is ever logged or
stored in an error.
"""

import contextlib
import hashlib
import hmac
import json
import logging
import time
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

import redis
from django.conf import settings
from django.db.models import F, Q
from django.utils import timezone

from apps.api.models import BatchJob, WebhookStatus
from apps.runs.engine.states import jittered_backoff_s
from apps.runs.models import ACTIVE_RUN_STATUSES, Run, RunStatus
from apps.secrets.crypto import SecretUnreadable, decrypt
from apps.tenants.context import current_tenant
from sluice.celery import app
from sluice.redis_client import redis_client
from workers.operators.base import PermanentError
from workers.outbound import (
    HttpResponse,
    OutboundRefused,
    OutboundTransient,
    request_json,
    resolve_target,
    retry_after_s,
)
from workers.queues import Queue

logger = logging.getLogger(__name__)

# The task (sluice/tasks.py) that makes one delivery attempt; sent by name.
DELIVER_JOB_WEBHOOK = "sluice.deliver_job_webhook"
EVENT_TYPE = "batch_job.finished"
SIGNATURE_HEADER = "Sluice-Signature"
DEFAULT_TOLERANCE_S = 300
BACKOFF_CAP_S = 600.0
# A claim lasts the request's timeout plus this, so DNS and a slow database fit inside it;
# past it the job counts as abandoned (worker lost) and another worker may send it.
CLAIM_MARGIN_S = 60.0
ERROR_EXCERPT_CHARS = 200
SWEEP_BATCH = 500
ENDED_RUN_STATUSES = tuple(s for s in RunStatus if s not in ACTIVE_RUN_STATUSES)
ENQUEUED_KEY = "sluice:webhook-enqueued:{}"


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The Sluice-Signature header value for `body` sent at `timestamp` (unix seconds)."""
    signed = f"{timestamp}.".encode() + body
    digest = hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def verify(
    secret: str,
    header: str,
    body: bytes,
    *,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    now: float | None = None,
) -> bool:
    """True when `header` signs `body` with `secret` and its timestamp is within
    `tolerance_s` of `now`. Several v1 entries are accepted, any one matching."""
    fields = [part.strip().partition("=") for part in header.split(",")]
    stamps = [value for name, _, value in fields if name == "t"]
    candidates = [value for name, _, value in fields if name == "v1"]
    if len(stamps) != 1 or not stamps[0].isdigit() or not candidates:
        return False
    timestamp = int(stamps[0])
    if abs((time.time() if now is None else now) - timestamp) > tolerance_s:
        return False
    expected = sign(secret, timestamp, body).partition(",v1=")[2]
    # compare_digest on ASCII str: a non-ASCII candidate would raise, so it is skipped.
    return any(c.isascii() and hmac.compare_digest(expected, c) for c in candidates)


def payload_for(job: BatchJob) -> dict[str, Any]:
    run = job.run
    return {
        "type": EVENT_TYPE,
        "job": str(job.id),
        "run": str(run.id),
        "status": run.status,
        "items": job.items,
        "finished_at": run.finished_at.isoformat() if run.finished_at else None,
        "error": run.error,
        "results": f"/api/jobs/{job.id}/results/",
    }


def backoff_s(attempts: int, base_s: float | None = None) -> float:
    """Delay after the `attempts`-th failed attempt: the steps' own backoff (doubling from
    SLUICE_WEBHOOK_BACKOFF_S, capped, equal jitter), so jobs that failed together spread out."""
    base = settings.SLUICE_WEBHOOK_BACKOFF_S if base_s is None else base_s
    return jittered_backoff_s(base, attempts, BACKOFF_CAP_S)


def due_jobs(now: datetime, limit: int) -> list[tuple[int, UUID]]:
    """(tenant id, job id) of jobs whose webhook should be sent now, oldest promise first."""
    # The sweeper looks across every tenant at once, so the scoped manager (which needs a
    # current tenant) cannot serve here; each delivery then runs in its own tenant's context.
    pending = BatchJob.unscoped_all_tenants.filter(
        Q(webhook_next_at__isnull=True) | Q(webhook_next_at__lte=now),
        webhook_status=WebhookStatus.PENDING,
        run__status__in=ENDED_RUN_STATUSES,
    )
    ordered = pending.order_by(F("webhook_next_at").asc(nulls_first=True))
    return list(ordered.values_list("tenant_id", "id")[:limit])


def enqueue_due(now: datetime | None = None, limit: int = SWEEP_BATCH) -> int:
    """Sends a delivery task for each due job (the sweeper's part: no HTTP here)."""
    # While a task waits behind a backlog on the cpu queue its job stays due, and the sweeper
    # runs every second: a marker in Redis keeps it to one message per job until a worker
    # takes it (deliver clears it) or, if that message was lost, SLUICE_REQUEUE_AFTER_S.
    marker_ms = int(settings.SLUICE_REQUEUE_AFTER_S * 1000)
    sent = 0
    for tenant_id, job_id in due_jobs(now or timezone.now(), limit):
        if redis_client().set(ENQUEUED_KEY.format(job_id), 1, nx=True, px=marker_ms):
            app.send_task(DELIVER_JOB_WEBHOOK, args=(tenant_id, str(job_id)), queue=Queue.CPU.value)
            sent += 1
    return sent


def deliver(job_id: UUID | str) -> str:
    """One attempt at the job's webhook, in the current tenant: "not due", "delivered",
    "retrying" or "failed"."""
    now = timezone.now()
    lease_until = now + timedelta(seconds=settings.SLUICE_WEBHOOK_TIMEOUT_S + CLAIM_MARGIN_S)
    claimed = _claim(job_id, now, lease_until)
    _forget_enqueued(job_id)
    if not claimed:
        return "not due"
    job = BatchJob.objects.select_related("run").get(id=job_id)
    if job.webhook_attempts > settings.SLUICE_WEBHOOK_MAX_ATTEMPTS:
        # The last allowed attempt was claimed and never recorded: its worker was lost. This
        # claim sends nothing, so it does not count.
        job.webhook_attempts -= 1
        lost = "the last attempt was lost with its worker (outcome unknown)"
        return _record_failure(job, lease_until, lost, permanent=True)
    try:
        response, signature = _send(job)
    except (OutboundRefused, SecretUnreadable) as exc:
        return _record_failure(job, lease_until, str(exc), permanent=True)
    except (OutboundTransient, PermanentError) as exc:
        # A TLS or malformed-response error may be the receiver's to fix: retried too.
        return _record_failure(job, lease_until, str(exc))
    if 200 <= response.status < 300:
        return _record_delivered(job)
    return _record_failure(
        job, lease_until, _status_error(response, signature), retry_after=_retry_after(response)
    )


def _claim(job_id: UUID | str, now: datetime, lease_until: datetime) -> bool:
    """One conditional UPDATE: only one worker (or sweep) may hold a job's attempt at a
    time. The run's status is a subquery, not a join, so PostgreSQL re-checks the job's own
    conditions against a row a concurrent claim has just updated (a joined UPDATE would be
    rewritten as `id IN (...)`, and that re-check would not see the new status)."""
    ended_runs = Run.objects.filter(status__in=ENDED_RUN_STATUSES).values("id")
    claimed = BatchJob.objects.filter(
        Q(webhook_next_at__isnull=True) | Q(webhook_next_at__lte=now),
        id=job_id,
        webhook_status=WebhookStatus.PENDING,
        run_id__in=ended_runs,
    ).update(
        # Counted when claimed, so a worker that dies mid-request still uses up an attempt.
        webhook_attempts=F("webhook_attempts") + 1,
        webhook_next_at=lease_until,
    )
    return claimed == 1


def _forget_enqueued(job_id: UUID | str) -> None:
    # Should Redis fail, the marker expires on its own; until then the sweeper waits to resend.
    with contextlib.suppress(redis.RedisError):
        redis_client().delete(ENQUEUED_KEY.format(job_id))


def _send(job: BatchJob) -> tuple[HttpResponse, str]:
    """POSTs the payload; returns the response and the signature (to keep it out of errors)."""
    target = resolve_target(job.webhook_url, current_tenant().outbound_allowlist)
    payload = payload_for(job)
    # Serialized exactly as request_json serializes it, so the signature covers the bytes on
    # the wire (the tests check it against what a real receiver read).
    body = json.dumps(payload, allow_nan=False).encode()
    headers = {
        "Content-Type": "application/json",
        "Sluice-Webhook-Id": str(job.id),
        "Idempotency-Key": f"batch-job-{job.id}",
    }
    signature = ""
    if job.webhook_secret:  # a job created without a secret is sent unsigned
        secret = decrypt(job.webhook_secret, name="webhook secret")
        signature = sign(secret, int(time.time()), body)
        headers[SIGNATURE_HEADER] = signature
    response = request_json(
        target,
        method="POST",
        body=payload,
        headers=headers,
        timeout_s=settings.SLUICE_WEBHOOK_TIMEOUT_S,
    )
    return response, signature


def _status_error(response: HttpResponse, signature: str) -> str:
    excerpt = response.text[:ERROR_EXCERPT_CHARS].strip()
    digest = signature.partition(",v1=")[2]
    if digest:  # a receiver that echoes the request's headers must not put it in the error
        excerpt = excerpt.replace(digest, "***")
    return f"{response.url} answered {response.status}" + (f": {excerpt}" if excerpt else "")


def _retry_after(response: HttpResponse) -> float | None:
    return retry_after_s(response) if response.status in (429, 503) else None


def _record_delivered(job: BatchJob) -> str:
    # Not conditional on the claim: even if this attempt outlived it, the receiver has the
    # webhook, and saying so stops further attempts.
    BatchJob.objects.filter(id=job.id).exclude(webhook_status=WebhookStatus.DELIVERED).update(
        webhook_status=WebhookStatus.DELIVERED,
        webhook_delivered_at=timezone.now(),
        webhook_next_at=None,
        webhook_last_error="",
    )
    logger.info("batch job %s: webhook delivered (attempt %s)", job.id, job.webhook_attempts)
    return "delivered"


def _record_failure(
    job: BatchJob,
    lease_until: datetime,
    error: str,
    *,
    permanent: bool = False,
    retry_after: float | None = None,
) -> str:
    """Schedules the next attempt, or gives up. Only while this attempt still holds the
    claim: one that outlived it must not overwrite the next attempt's schedule."""
    attempts = job.webhook_attempts
    give_up = permanent or attempts >= settings.SLUICE_WEBHOOK_MAX_ATTEMPTS
    if give_up:
        fields: dict[str, Any] = {"webhook_status": WebhookStatus.FAILED, "webhook_next_at": None}
        error = f"{error} (gave up after {attempts} attempt{'s' if attempts != 1 else ''})"
    else:
        delay = max(backoff_s(attempts), retry_after or 0.0)
        fields = {"webhook_next_at": timezone.now() + timedelta(seconds=delay)}
    BatchJob.objects.filter(
        id=job.id, webhook_status=WebhookStatus.PENDING, webhook_next_at=lease_until
    ).update(webhook_attempts=attempts, webhook_last_error=error, **fields)
    outcome = "failed" if give_up else "retrying"
    logger.warning("batch job %s: webhook attempt %s %s: %s", job.id, attempts, outcome, error)
    return outcome
