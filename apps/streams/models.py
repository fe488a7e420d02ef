"""Stream deployments: a graph version bound to a source (Kafka topics, a webhook, a
schedule), the offsets that say how far it has read, and the records it could not take."""

import uuid
from datetime import UTC, datetime

from django.conf import settings
from django.db import models

from apps.graphs.models import GraphVersion, StreamGraph
from apps.runs.models import Run
from apps.tenants.models import TenantModel


class SourceKind(models.TextChoices):
    KAFKA = "kafka"
    WEBHOOK = "webhook"
    SCHEDULE = "schedule"


# The source node types that make a version a stream deployment, and their kinds.
SOURCE_KINDS = {
    "source.kafka": SourceKind.KAFKA,
    "source.webhook": SourceKind.WEBHOOK,
    "source.schedule": SourceKind.SCHEDULE,
}


class DeploymentStatus(models.TextChoices):
    RUNNING = "running"
    # Not consuming; Kafka workers keep the group's partitions so resuming is immediate.
    PAUSED = "paused"
    # Consuming up to the end of each partition, then stopped.
    DRAINING = "draining"
    STOPPED = "stopped"


ACTIVE_DEPLOYMENT_STATUSES = (
    DeploymentStatus.RUNNING,
    DeploymentStatus.PAUSED,
    DeploymentStatus.DRAINING,
)


class Deployment(TenantModel):
    """One per graph: the version it runs now and the stream run that version's events and
    steps belong to. A redeploy changes `version` and `run` in one transaction; every
    micro-batch checks, in its own transaction, that it was processed with that version."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    graph = models.OneToOneField(StreamGraph, on_delete=models.CASCADE, related_name="deployment")
    version = models.ForeignKey(GraphVersion, on_delete=models.PROTECT, related_name="+")
    run = models.ForeignKey(Run, on_delete=models.PROTECT, related_name="+")
    source_kind = models.CharField(max_length=16, choices=SourceKind.choices)
    status = models.CharField(
        max_length=16, choices=DeploymentStatus.choices, default=DeploymentStatus.RUNNING
    )
    # The Kafka consumer group: one per deployment, kept across versions (the offsets that
    # count are in PartitionOffset; the group's own are for lag tools).
    group_id = models.CharField(max_length=255)
    # Webhook source: the signing secret, encrypted (apps.secrets.crypto).
    webhook_secret = models.TextField(blank=True)
    # Schedule source: the last tick that fired.
    last_tick_at = models.DateTimeField(null=True, blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta(TenantModel.Meta):
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"deployment {self.id}"


class PartitionOffset(TenantModel):
    """How far a deployment has read one partition: the next offset to read is the truth,
    moved only in the transaction that commits the records before it (compare and set)."""

    deployment = models.ForeignKey(Deployment, on_delete=models.CASCADE, related_name="offsets")
    topic = models.CharField(max_length=249)
    partition = models.IntegerField()
    next_offset = models.BigIntegerField()
    # As the worker last saw them, for the page: the partition's end and the records taken.
    high_watermark = models.BigIntegerField(default=0)
    records = models.BigIntegerField(default=0)
    dead_letters = models.BigIntegerField(default=0)
    # Records per second over the worker's recent batches on this partition.
    rate = models.FloatField(default=0.0)
    # Event time (epoch ms): the largest seen minus the source's max_delay, or moved on by
    # the wall clock while the partition is idle. Windows fire on it. None: no record yet.
    watermark_ms = models.BigIntegerField(null=True, blank=True)
    # Events later than their window allowed, per window node: {"node id": count}.
    late = models.JSONField(default=dict, blank=True)
    # Moved by every commit that writes this partition's window or memory state, even one
    # that takes no record (windows fired as the partition idles): a worker that has lost
    # the partition cannot write over the state the new owner loaded (compare and set).
    state_version = models.BigIntegerField(default=0)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta(TenantModel.Meta):
        ordering = ["topic", "partition"]
        constraints = [
            models.UniqueConstraint(
                fields=["deployment", "topic", "partition"], name="offset_once_per_partition"
            )
        ]

    @property
    def lag(self) -> int:
        return max(self.high_watermark - self.next_offset, 0)

    @property
    def watermark(self) -> datetime | None:
        if self.watermark_ms is None:
            return None
        return datetime.fromtimestamp(self.watermark_ms / 1000, tz=UTC)

    @property
    def late_total(self) -> int:
        return sum(int(count) for count in self.late.values())


class DeadLetter(TenantModel):
    """A record the deployment could not take (not JSON, fails the input schema, a node
    raised on it), kept with its coordinates so it can be read, fixed upstream and replayed.
    It never blocks its partition: the batch commits past it."""

    deployment = models.ForeignKey(
        Deployment, on_delete=models.CASCADE, related_name="dead_letters"
    )
    topic = models.CharField(max_length=249, blank=True)
    partition = models.IntegerField(null=True, blank=True)
    offset = models.BigIntegerField(null=True, blank=True)
    key = models.TextField(blank=True)
    error = models.TextField()
    # The record's value, whole up to 1 MB (decoded as UTF-8, invalid bytes replaced).
    payload = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    replayed_at = models.DateTimeField(null=True, blank=True)
    # Where the replayed copy landed.
    replay_offset = models.BigIntegerField(null=True, blank=True)

    class Meta(TenantModel.Meta):
        ordering = ["-created_at", "-id"]
        constraints = [
            models.UniqueConstraint(
                fields=["deployment", "topic", "partition", "offset"],
                name="dead_letter_once_per_record",
                condition=models.Q(offset__isnull=False),
            )
        ]

    @property
    def excerpt(self) -> str:
        return self.payload[:300]


class WebhookDelivery(TenantModel):
    """A signed webhook request taken: the signature is unique, so the same request sent
    again inside the timestamp window is refused instead of ingested twice."""

    deployment = models.ForeignKey(Deployment, on_delete=models.CASCADE, related_name="+")
    signature = models.CharField(max_length=64)
    received_at = models.DateTimeField(auto_now_add=True)

    class Meta(TenantModel.Meta):
        constraints = [
            models.UniqueConstraint(
                fields=["deployment", "signature"], name="webhook_delivery_once"
            )
        ]
        # The deployment page's events/s: deliveries in the last minute.
        indexes = [
            models.Index(fields=["deployment", "received_at"], name="webhook_delivery_recent")
        ]


class ScheduleTick(TenantModel):
    """A schedule's tick that fired: unique, so two beats, or one restarted across the tick,
    fire it exactly once."""

    deployment = models.ForeignKey(Deployment, on_delete=models.CASCADE, related_name="+")
    tick_at = models.DateTimeField()
    fired_at = models.DateTimeField(auto_now_add=True)

    class Meta(TenantModel.Meta):
        ordering = ["-tick_at"]
        constraints = [
            models.UniqueConstraint(fields=["deployment", "tick_at"], name="schedule_tick_once")
        ]


class KeyedState(TenantModel):
    """One entry of a stateful node's state in one partition: an open window (slot: its
    start) or a memory list (slot: ""). Written in the micro-batch's transaction with the
    partition's offset, so it always matches the records taken. Kept per deployment across
    redeploys while the node's id and config stay the same."""

    deployment = models.ForeignKey(Deployment, on_delete=models.CASCADE, related_name="+")
    # The node id, or "store:<name>" for memory nodes sharing a store.
    owner = models.CharField(max_length=100)
    partition = models.CharField(max_length=260)  # "<topic>:<partition>"
    key = models.CharField(max_length=200)
    slot = models.CharField(max_length=40, blank=True)
    value = models.JSONField()
    updated_at = models.DateTimeField(auto_now=True)

    class Meta(TenantModel.Meta):
        constraints = [
            models.UniqueConstraint(
                fields=["deployment", "owner", "partition", "key", "slot"],
                name="keyed_state_once",
            )
        ]
