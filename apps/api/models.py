"""What the REST API keeps of its own: batch jobs and idempotent replies."""

import uuid

from django.conf import settings
from django.db import models

from apps.runs.models import Run
from apps.tenants.models import TenantModel


class WebhookStatus(models.TextChoices):
    NONE = ""  # the job asked for no webhook
    PENDING = "pending"  # due once the job's run has ended
    DELIVERED = "delivered"
    FAILED = "failed"  # attempts exhausted; last_error says why


class BatchJob(TenantModel):
    """Many inputs run as one batch run (one source step per input), submitted through the
    API. The run carries the progress; the job keeps what was promised before it started
    (the pre-flight estimate) and the completion webhook's delivery state."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    run = models.OneToOneField(Run, on_delete=models.CASCADE, related_name="batch_job")
    items = models.PositiveIntegerField()
    # The pre-flight estimate made when the job was accepted (apps.api.estimates).
    estimate = models.JSONField(default=dict)
    webhook_url = models.URLField(max_length=2000, blank=True)
    # Fernet-encrypted (apps.secrets.crypto); signs the webhook's body. Never returned.
    webhook_secret = models.TextField(blank=True)
    webhook_status = models.CharField(
        max_length=16, choices=WebhookStatus.choices, blank=True, default=WebhookStatus.NONE
    )
    webhook_attempts = models.PositiveIntegerField(default=0)
    webhook_next_at = models.DateTimeField(null=True, blank=True)
    webhook_delivered_at = models.DateTimeField(null=True, blank=True)
    webhook_last_error = models.TextField(blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta(TenantModel.Meta):
        ordering = ["-created_at"]
        indexes = [
            models.Index(
                fields=["webhook_next_at"],
                name="batchjob_webhook_due",
                condition=models.Q(webhook_status="pending"),
            )
        ]

    def __str__(self) -> str:
        return f"batch job {self.id}"


class IdempotentReply(TenantModel):
    """The reply to a request sent with an `Idempotency-Key`, stored in the same transaction
    as the request's writes: a repeat with the same key and body gets this reply again; the
    same key with another body is refused. Per tenant, so keys never collide across tenants."""

    key = models.CharField(max_length=255)
    # SHA-256 of method, path and body: what "the same request" means.
    request_digest = models.CharField(max_length=64)
    status = models.PositiveSmallIntegerField()
    body = models.JSONField(null=True)
    location = models.CharField(max_length=2000, blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta(TenantModel.Meta):
        constraints = [
            models.UniqueConstraint(fields=["tenant", "key"], name="idempotent_reply_once")
        ]
