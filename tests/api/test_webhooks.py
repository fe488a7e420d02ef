"""The batch job's completion webhook: signature, retries with backoff, once per job, and the
beat sweep delivering it through real worker processes. The receiver is a real HTTP server on
loopback; what it read off the socket is what the assertions check."""

import json
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from django.db import connection, transaction
from django.utils import timezone

from apps.api import webhooks
from apps.api.models import BatchJob, WebhookStatus
from apps.runs.models import Run, RunKind, RunStatus
from apps.runs.services import cancel_run, start_run
from apps.secrets.crypto import encrypt
from apps.tenants.context import tenant_context
from apps.tenants.models import Tenant
from tests.conftest import World
from tests.runs.helpers import wait_for_run, wait_until

SECRET = "whsec-test-0123456789"
SPEC = {
    "nodes": [
        {"id": "in", "type": "source.manual"},
        {"id": "store", "type": "sink.table", "config": {"table": "answers"}},
    ],
    "edges": [["in", "store"]],
}


class Receiver:
    """Answers each POST with the next status of `script` (then 200) and keeps the raw
    body and headers of every request it read."""

    def __init__(
        self, script: list[int] | None = None, *, delay_s: float = 0.0, retry_after: str = ""
    ) -> None:
        self.script = list(script or [])
        self.delay_s = delay_s
        self.retry_after = retry_after
        self.lock = threading.Lock()
        self.requests: list[tuple[dict[str, str], bytes, float]] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks/sluice"

    def __enter__(self) -> "Receiver":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)

    def _answer(self, headers: dict[str, str], body: bytes) -> int:
        with self.lock:
            self.requests.append((headers, body, time.time()))
            return self.script.pop(0) if self.script else 200

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                time.sleep(receiver.delay_s)
                status = receiver._answer(dict(self.headers.items()), body)
                self.send_response(status)
                if status in (429, 503) and receiver.retry_after:
                    self.send_header("Retry-After", receiver.retry_after)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as running:
        yield running


def allow_loopback(tenant: Tenant) -> None:
    tenant.outbound_allowlist = ["127.0.0.1"]
    tenant.save(update_fields=["outbound_allowlist"])


def batch_job(world: World, url: str, *, end: bool = True, slug: str = "batch") -> BatchJob:
    """A batch run with its job, as the job service makes them; ended by a cancel."""
    graph = world.graph(slug, SPEC)
    with tenant_context(world.acme):
        run = start_run(
            version=graph.live_version(), payload={"n": 1}, actor=world.owner, kind=RunKind.BATCH
        )
        job = BatchJob.objects.create(
            run=run,
            items=3,
            webhook_url=url,
            webhook_secret=encrypt(SECRET),
            webhook_status=WebhookStatus.PENDING,
        )
        if end:
            assert cancel_run(run, actor=world.owner)
    return job


def deliver(world: World, job: BatchJob) -> str:
    with tenant_context(world.acme):
        return webhooks.deliver(job.id)


def reload(job: BatchJob) -> BatchJob:
    return BatchJob.unscoped_all_tenants.get(id=job.id)


def make_due(job: BatchJob) -> None:
    BatchJob.unscoped_all_tenants.filter(id=job.id).update(
        webhook_next_at=timezone.now() - timedelta(seconds=1)
    )


# Signature


def test_sign_and_verify_round_trip() -> None:
    body = b'{"job": "1"}'
    header = webhooks.sign(SECRET, 1_700_000_000, body)
    assert header.startswith("t=1700000000,v1=") and len(header.split("v1=")[1]) == 64
    assert webhooks.verify(SECRET, header, body, now=1_700_000_010)
    assert not webhooks.verify("another secret", header, body, now=1_700_000_010)


def test_a_tampered_body_fails() -> None:
    header = webhooks.sign(SECRET, 1_700_000_000, b'{"status": "failed"}')
    assert not webhooks.verify(SECRET, header, b'{"status": "succeeded"}', now=1_700_000_000)


def test_an_old_or_future_timestamp_fails() -> None:
    body = b"{}"
    header = webhooks.sign(SECRET, 1_700_000_000, body)
    assert not webhooks.verify(SECRET, header, body, now=1_700_000_000 + 301)
    assert not webhooks.verify(SECRET, header, body, now=1_700_000_000 - 301)
    assert webhooks.verify(SECRET, header, body, now=1_700_000_000 + 301, tolerance_s=600)


def test_malformed_headers_fail() -> None:
    body = b"{}"
    for header in ["", "v1=abc", "t=x,v1=abc", "t=1,t=2,v1=abc", "t=1700000000,v1=\u00e9"]:
        assert not webhooks.verify(SECRET, header, body, now=1_700_000_000)


def test_backoff_doubles_with_jitter_up_to_the_cap() -> None:
    for attempts, nominal in [(1, 2.0), (2, 4.0), (3, 8.0), (12, 600.0), (100, 600.0)]:
        delays = [webhooks.backoff_s(attempts, 2.0) for _ in range(50)]
        assert all(nominal / 2 <= d <= nominal for d in delays)
        assert len(set(delays)) > 1  # jittered


# Delivery against a real receiver


@pytest.mark.django_db
def test_delivered_once_signed_with_the_job_id(world: World, receiver: Receiver) -> None:
    allow_loopback(world.acme)
    job = batch_job(world, receiver.url)
    assert deliver(world, job) == "delivered"

    [(headers, body, _)] = receiver.requests
    assert headers["Sluice-Webhook-Id"] == str(job.id)
    assert headers["Idempotency-Key"] == f"batch-job-{job.id}"
    assert headers["Content-Type"] == "application/json"
    assert webhooks.verify(SECRET, headers["Sluice-Signature"], body)
    run = Run.unscoped_all_tenants.get(id=job.run_id)
    assert json.loads(body) == {
        "type": "batch_job.finished",
        "job": str(job.id),
        "run": str(run.id),
        "status": RunStatus.CANCELLED,
        "items": 3,
        "finished_at": run.finished_at.isoformat() if run.finished_at else None,
        "error": "cancelled by owner",
        "results": f"/api/jobs/{job.id}/results/",
    }
    job = reload(job)
    assert job.webhook_status == WebhookStatus.DELIVERED and job.webhook_attempts == 1
    assert job.webhook_delivered_at is not None and job.webhook_next_at is None

    # Delivered: later calls, sweeps included, send nothing.
    BatchJob.unscoped_all_tenants.filter(id=job.id).update(webhook_next_at=None)
    assert deliver(world, job) == "not due"
    assert webhooks.due_jobs(timezone.now(), 10) == []
    assert len(receiver.requests) == 1


@pytest.mark.django_db
def test_failures_are_retried_with_backoff_until_delivered(world: World) -> None:
    allow_loopback(world.acme)
    with Receiver([500, 500]) as receiver:
        job = batch_job(world, receiver.url)
        delays = []
        for expected in ["retrying", "retrying", "delivered"]:
            before = timezone.now()
            assert deliver(world, job) == expected
            job = reload(job)
            if expected == "retrying":
                assert job.webhook_next_at is not None
                delays.append((job.webhook_next_at - before).total_seconds())
                # Not due until the backoff has passed, not even for the sweeper.
                assert deliver(world, job) == "not due"
                assert webhooks.due_jobs(timezone.now(), 10) == []
                make_due(job)
        assert len(receiver.requests) == 3
    # Base 2 s doubling, each between half and all of its nominal delay.
    assert 1.0 <= delays[0] <= 2.5 and 2.0 <= delays[1] <= 4.5
    assert job.webhook_status == WebhookStatus.DELIVERED and job.webhook_attempts == 3
    assert job.webhook_last_error == ""
    # Each attempt is signed afresh; all carry the same id for the receiver to deduplicate.
    ids = {headers["Sluice-Webhook-Id"] for headers, _, _ in receiver.requests}
    assert ids == {str(job.id)}
    assert all(webhooks.verify(SECRET, h["Sluice-Signature"], b) for h, b, _ in receiver.requests)


@pytest.mark.django_db
def test_gives_up_after_max_attempts(world: World, settings: Any) -> None:
    settings.SLUICE_WEBHOOK_MAX_ATTEMPTS = 3
    allow_loopback(world.acme)
    with Receiver([404] * 10) as receiver:
        job = batch_job(world, receiver.url)
        outcomes = []
        for _ in range(4):
            outcomes.append(deliver(world, job))
            make_due(job)
        assert len(receiver.requests) == 3
    assert outcomes == ["retrying", "retrying", "failed", "not due"]
    job = reload(job)
    assert job.webhook_status == WebhookStatus.FAILED and job.webhook_attempts == 3
    assert job.webhook_last_error == (
        f"http://127.0.0.1:{receiver.server.server_address[1]}/hooks/sluice answered 404: {{}}"
        " (gave up after 3 attempts)"
    )
    assert SECRET not in job.webhook_last_error


@pytest.mark.django_db
def test_a_last_attempt_lost_with_its_worker_fails_without_sending(
    world: World, receiver: Receiver, settings: Any
) -> None:
    settings.SLUICE_WEBHOOK_MAX_ATTEMPTS = 2
    allow_loopback(world.acme)
    job = batch_job(world, receiver.url)
    # Attempt 2 was claimed (counted, lease set) and its worker died before recording it.
    BatchJob.unscoped_all_tenants.filter(id=job.id).update(webhook_attempts=2)
    make_due(job)  # the lease has lapsed
    assert deliver(world, job) == "failed"
    assert receiver.requests == []
    job = reload(job)
    assert job.webhook_status == WebhookStatus.FAILED and job.webhook_attempts == 2
    assert "lost with its worker" in job.webhook_last_error


@pytest.mark.django_db
def test_retry_after_is_honoured(world: World) -> None:
    allow_loopback(world.acme)
    with Receiver([429], retry_after="120") as receiver:
        job = batch_job(world, receiver.url)
        before = timezone.now()
        assert deliver(world, job) == "retrying"
    job = reload(job)
    assert job.webhook_next_at is not None
    assert 120 <= (job.webhook_next_at - before).total_seconds() <= 125
    assert "answered 429" in job.webhook_last_error


@pytest.mark.django_db
def test_a_refused_connection_is_retried(world: World) -> None:
    allow_loopback(world.acme)
    with Receiver() as receiver:
        url = receiver.url
    job = batch_job(world, url)  # nothing listens there any more
    assert deliver(world, job) == "retrying"
    job = reload(job)
    assert job.webhook_status == WebhookStatus.PENDING and job.webhook_attempts == 1
    assert "connection to" in job.webhook_last_error and "failed" in job.webhook_last_error


@pytest.mark.django_db
def test_a_job_whose_run_is_active_is_not_due(world: World, receiver: Receiver) -> None:
    allow_loopback(world.acme)
    job = batch_job(world, receiver.url, end=False)
    assert webhooks.due_jobs(timezone.now(), 10) == []
    assert deliver(world, job) == "not due"
    assert receiver.requests == []
    assert reload(job).webhook_attempts == 0

    with tenant_context(world.acme):
        cancel_run(Run.objects.get(id=job.run_id), actor=world.owner)
    assert webhooks.due_jobs(timezone.now(), 10) == [(world.acme.id, job.id)]


@pytest.mark.django_db
def test_a_private_address_without_allowlist_fails_at_once(
    world: World, receiver: Receiver
) -> None:
    job = batch_job(world, receiver.url)  # loopback, and acme's allowlist is empty
    assert deliver(world, job) == "failed"
    assert receiver.requests == []
    job = reload(job)
    assert job.webhook_status == WebhookStatus.FAILED and job.webhook_attempts == 1
    assert "127.0.0.1, a loopback address" in job.webhook_last_error
    assert "outbound allowlist" in job.webhook_last_error


@pytest.mark.django_db
def test_due_jobs_spans_tenants_and_deliver_stays_in_its_own(
    world: World, receiver: Receiver
) -> None:
    allow_loopback(world.acme)
    job = batch_job(world, receiver.url)
    with tenant_context(world.globex):
        # The job is due, but not this tenant's: nothing is claimed or sent.
        assert webhooks.deliver(job.id) == "not due"
    assert webhooks.due_jobs(timezone.now(), 10) == [(world.acme.id, job.id)]
    assert receiver.requests == []


@pytest.mark.django_db
def test_enqueue_due_sends_one_task_per_job_until_a_worker_takes_it(
    world: World, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent: list[tuple[Any, Any]] = []

    def send_task(name: str, args: Any, queue: str) -> None:
        assert name == "sluice.deliver_job_webhook"  # the task's name is the contract
        sent.append((args, queue))

    monkeypatch.setattr(webhooks.app, "send_task", send_task)
    allow_loopback(world.acme)
    job = batch_job(world, receiver.url)
    assert webhooks.enqueue_due() == 1
    assert webhooks.enqueue_due() == 0  # still waiting in the queue: no second message
    assert sent == [((world.acme.id, str(job.id)), "cpu")]
    assert deliver(world, job) == "delivered"
    assert webhooks.enqueue_due() == 0
    assert receiver.requests != []


@pytest.mark.django_db(transaction=True)
def test_two_concurrent_deliveries_send_one_request(world: World) -> None:
    allow_loopback(world.acme)
    with Receiver(delay_s=0.5) as receiver:
        job = batch_job(world, receiver.url)
        outcomes: list[str] = []
        start = threading.Barrier(2)

        def attempt() -> None:
            try:
                start.wait()
                outcomes.append(deliver(world, job))
            finally:
                connection.close()

        threads = [threading.Thread(target=attempt) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert len(receiver.requests) == 1
    assert sorted(outcomes) == ["delivered", "not due"]
    assert reload(job).webhook_attempts == 1


# Through real worker and beat processes


@pytest.mark.workers
@pytest.mark.django_db(transaction=True)
def test_the_beat_sweep_delivers_after_the_run_ends(world: World, platform: object) -> None:
    allow_loopback(world.acme)
    graph = world.graph("batch", SPEC)
    with Receiver() as receiver, tenant_context(world.acme):
        with transaction.atomic():  # as the job service does: the run and its job together
            run = start_run(
                version=graph.live_version(),
                payload={"n": 1},
                actor=world.owner,
                kind=RunKind.BATCH,
            )
            job = BatchJob.objects.create(
                run=run,
                items=1,
                webhook_url=receiver.url,
                webhook_secret=encrypt(SECRET),
                webhook_status=WebhookStatus.PENDING,
            )
        run = wait_for_run(run, timeout=30)
        assert run.status == RunStatus.SUCCEEDED
        wait_until(lambda: reload(job).webhook_status == WebhookStatus.DELIVERED, 30, "webhook")
        time.sleep(2)  # a few more sweeps: none sends it again
        [(headers, body, _)] = receiver.requests
    assert webhooks.verify(SECRET, headers["Sluice-Signature"], body)
    assert json.loads(body)["status"] == RunStatus.SUCCEEDED
    assert reload(job).webhook_attempts == 1
