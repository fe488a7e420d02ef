import hashlib
import secrets
from datetime import datetime, timedelta
from typing import Any, ClassVar

from django.conf import settings
from django.contrib.postgres.fields import ArrayField
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.utils import timezone

from apps.tenants.context import current_tenant
from apps.tenants.quotas import (
    FEED_RETENTION_DAYS_DEFAULT,
    FEED_RETENTION_DAYS_MAX,
    QUOTA_FIELDS,
    check_quota_value,
)
from workers.inference.registry import RegistryError, check_overrides


class Tenant(models.Model):
    slug = models.SlugField(max_length=63, unique=True)
    name = models.CharField(max_length=200)
    # Hosts that tool.http and sink.webhook may call although they resolve to private,
    # loopback or link-local addresses (an internal service the tenant owns). Exact names.
    outbound_allowlist = ArrayField(models.CharField(max_length=253), default=list, blank=True)
    # Inference spend allowed per calendar month (UTC), across all runs; none when empty.
    monthly_budget_usd = models.DecimalField(max_digits=12, decimal_places=6, null=True, blank=True)
    # Quotas (apps.tenants.quotas, checked when a run starts); none when empty.
    # Runs queued or running at once.
    max_active_runs = models.PositiveIntegerField(null=True, blank=True)
    # The largest `policies.budget_usd` a run may get.
    max_run_budget_usd = models.DecimalField(max_digits=12, decimal_places=6, null=True, blank=True)
    # Admission control (apps.api.admission); empty means the platform default from
    # settings. Steps waiting for a worker, across all the tenant's runs.
    max_queued_steps = models.PositiveIntegerField(null=True, blank=True)
    # Events accepted per second through the API (stream events and batch inputs).
    max_events_per_s = models.PositiveIntegerField(null=True, blank=True)
    # Requests per minute allowed to each of the tenant's API keys.
    api_requests_per_min = models.PositiveIntegerField(null=True, blank=True)
    # Days a finished run keeps its live feed's frames; then the sweeper replaces them with
    # a summary of the run's final outputs (apps.live.retention).
    feed_retention_days = models.PositiveIntegerField(
        default=FEED_RETENTION_DAYS_DEFAULT,
        validators=[MinValueValidator(1), MaxValueValidator(FEED_RETENTION_DAYS_MAX)],
    )
    # Per model: negotiated prices, quality tier, fallbacks (workers.inference.registry).
    model_overrides = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        # Which fields a tenant may override is the registry's rule (no engine, no params).
        # The quotas' bounds are the Settings page's, for the admin too.
        errors = {
            name: problem
            for name in QUOTA_FIELDS
            if (problem := check_quota_value(name, getattr(self, name))) is not None
        }
        try:
            check_overrides(self.model_overrides)
        except RegistryError as exc:
            errors["model_overrides"] = str(exc)
        if errors:
            raise ValidationError(errors)


class TenantScopedManager(models.Manager[Any]):
    """Default manager of every tenant-owned model: rows of the current tenant only.

    With no current tenant it raises rather than returning everything (fail closed).
    """

    def get_queryset(self) -> models.QuerySet[Any]:
        return super().get_queryset().filter(tenant_id=current_tenant().pk)


class TenantModel(models.Model):
    """Base of every tenant-owned row. `objects` is scoped to the current tenant;
    `unscoped_all_tenants` sees every tenant and is for admin, sweepers and migrations only."""

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, db_index=True, related_name="+")

    objects: ClassVar[TenantScopedManager] = TenantScopedManager()
    unscoped_all_tenants: ClassVar[models.Manager[Any]] = models.Manager()

    class Meta:
        abstract = True
        # Related-object lookups (step.run) and deletion cascades go through the base
        # manager; they follow foreign keys from rows already scoped, so they stay plain.
        base_manager_name = "unscoped_all_tenants"

    def save(self, *args: Any, **kwargs: Any) -> None:
        if self.tenant_id is None:
            self.tenant = current_tenant()
        super().save(*args, **kwargs)


class Role(models.TextChoices):
    OWNER = "owner"
    EDITOR = "editor"
    OPERATOR = "operator"
    VIEWER = "viewer"


# What each role may do. Checked by apps.tenants.access.require_role.
ROLE_RANK = {Role.VIEWER: 0, Role.OPERATOR: 1, Role.EDITOR: 2, Role.OWNER: 3}


class Membership(TenantModel):
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships"
    )
    role = models.CharField(max_length=16, choices=Role.choices)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["tenant", "user"], name="membership_one_per_tenant")
        ]

    def __str__(self) -> str:
        return f"{self.user} in {self.tenant_id} as {self.role}"

    def allows(self, role: str) -> bool:
        return ROLE_RANK[Role(self.role)] >= ROLE_RANK[Role(role)]


API_KEY_PREFIX_LEN = 8


def hash_api_secret(secret: str) -> str:
    # API secrets and invite tokens are 256 random bits, so a fast hash is enough; no salt.
    return hashlib.sha256(secret.encode()).hexdigest()


class ApiKey(TenantModel):
    name = models.CharField(max_length=100)
    prefix = models.CharField(max_length=API_KEY_PREFIX_LEN, unique=True)
    hashed_secret = models.CharField(max_length=64)
    scopes = models.JSONField(default=list)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"

    @staticmethod
    def new_secret() -> tuple[str, str]:
        """(prefix, full key). The full key is shown once and never stored."""
        prefix = secrets.token_hex(API_KEY_PREFIX_LEN // 2)
        return prefix, f"sk_{prefix}_{secrets.token_urlsafe(32)}"


INVITE_TTL = timedelta(days=7)


class InviteState(models.TextChoices):
    PENDING = "pending"
    ACCEPTED = "accepted"
    REVOKED = "revoked"
    EXPIRED = "expired"


class Invitation(TenantModel):
    """An invite by link. Only the SHA-256 of the token is stored; the link is shown to the
    owner once and mailed to the address."""

    email = models.EmailField()
    role = models.CharField(max_length=16, choices=Role.choices)
    token_hash = models.CharField(max_length=64, unique=True)
    invited_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField()
    accepted_at = models.DateTimeField(null=True, blank=True)
    accepted_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    revoked_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"invite of {self.email} to {self.tenant_id} as {self.role}"

    def state(self, now: datetime | None = None) -> InviteState:
        if self.accepted_at is not None:
            return InviteState.ACCEPTED
        if self.revoked_at is not None:
            return InviteState.REVOKED
        if self.expires_at <= (now or timezone.now()):
            return InviteState.EXPIRED
        return InviteState.PENDING

    @staticmethod
    def new_token() -> str:
        return secrets.token_urlsafe(32)
