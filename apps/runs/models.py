import uuid
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.contrib.postgres.fields import ArrayField
from django.db import models

from apps.graphs.access import version_nodes, version_spec
from apps.graphs.models import GraphVersion
from apps.tenants.models import TenantModel


class RunKind(models.TextChoices):
    INTERACTIVE = "interactive"
    BATCH = "batch"
    STREAM = "stream"


class RunStatus(models.TextChoices):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    # The run's or its tenant's budget was spent; `error` states the figure.
    BUDGET_EXCEEDED = "budget_exceeded"


ACTIVE_RUN_STATUSES = (RunStatus.QUEUED, RunStatus.RUNNING)


class Run(TenantModel):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    graph_version = models.ForeignKey(GraphVersion, on_delete=models.PROTECT, related_name="runs")
    kind = models.CharField(max_length=16, choices=RunKind.choices, default=RunKind.INTERACTIVE)
    status = models.CharField(max_length=16, choices=RunStatus.choices, default=RunStatus.QUEUED)
    input = models.JSONField(default=dict)
    deadline = models.DateTimeField(null=True, blank=True)
    budget_usd = models.DecimalField(max_digits=12, decimal_places=6, null=True, blank=True)
    on_disconnect = models.CharField(max_length=16, default="detach")
    # How long a `cancel` run may have no viewer before it is cancelled; empty: the default
    # (SLUICE_VIEWER_GRACE_S).
    disconnect_grace_s = models.FloatField(null=True, blank=True)
    # Steps not yet in a final state. Changed only inside step transactions; zero ends the run.
    open_steps = models.IntegerField(default=0)
    # Re-attempts so far (failed attempts and lost workers), held under the retry budget.
    retries = models.IntegerField(default=0)
    # Steps that failed (dead, or past their node's deadline) with no collect to absorb
    # them; above zero the run ends failed.
    failures = models.IntegerField(default=0)
    error = models.TextField(blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta(TenantModel.Meta):
        ordering = ["-created_at"]
        indexes = [
            models.Index(fields=["status", "deadline"], name="run_status_deadline"),
            # The feed's retention walks each tenant's finished runs oldest first
            # (apps/live/retention.py).
            models.Index(
                fields=["tenant", "finished_at", "id"],
                name="run_tenant_finished",
                condition=models.Q(finished_at__isnull=False),
            ),
        ]

    def __str__(self) -> str:
        return f"run {self.id}"

    @property
    def is_active(self) -> bool:
        return self.status in ACTIVE_RUN_STATUSES

    @property
    def spec(self) -> dict[str, Any]:
        return version_spec(self.graph_version_id)

    @property
    def nodes(self) -> dict[str, dict[str, Any]]:
        return version_nodes(self.graph_version_id)


class StepStatus(models.TextChoices):
    QUEUED = "queued"
    RUNNING = "running"
    FAILED = "failed"  # an attempt failed; it is queued again for not_before
    DONE = "done"
    DEAD = "dead"  # out of attempts, or a permanent error: dead-lettered
    SKIPPED = "skipped"


FINAL_STEP_STATUSES = (StepStatus.DONE, StepStatus.DEAD, StepStatus.SKIPPED)
CLAIMABLE_STEP_STATUSES = (StepStatus.QUEUED, StepStatus.FAILED)


class Step(TenantModel):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="steps")
    node_id = models.CharField(max_length=64)
    node_type = models.CharField(max_length=64)
    queue = models.CharField(max_length=32)
    status = models.CharField(max_length=16, choices=StepStatus.choices, default=StepStatus.QUEUED)
    inputs = ArrayField(models.UUIDField(), default=list)
    # Open fan-outs around this step's input, outermost first:
    # [[fan-out step id, item index, fan-out node id], ...]
    scopes = models.JSONField(default=list)
    # The innermost of them, kept as columns for fan-in accounting and display.
    scope = models.UUIDField(null=True, blank=True)
    item_index = models.IntegerField(null=True, blank=True)
    attempt = models.PositiveIntegerField(default=0)
    max_attempts = models.PositiveIntegerField(default=3)
    lease_until = models.DateTimeField(null=True, blank=True)
    lease_token = models.UUIDField(null=True, blank=True)
    worker = models.CharField(max_length=200, blank=True)
    not_before = models.DateTimeField(null=True, blank=True)
    # From the node's ttl_s: past it the step is skipped with reason "deadline".
    deadline = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    enqueued_at = models.DateTimeField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    duration_ms = models.FloatField(null=True, blank=True)
    # The operator's own time within duration_ms; the rest is the platform's overhead.
    operator_ms = models.FloatField(null=True, blank=True)
    # Inference, summed over the step's attempts (Usage has one row per attempt).
    model = models.CharField(max_length=100, blank=True)
    tokens_in = models.PositiveIntegerField(default=0)
    tokens_out = models.PositiveIntegerField(default=0)
    wasted_tokens = models.PositiveIntegerField(default=0)
    cost_usd = models.DecimalField(max_digits=12, decimal_places=6, default=Decimal(0))
    # From the stop signal (cancel, deadline, budget) to the engine no longer generating.
    stop_latency_ms = models.FloatField(null=True, blank=True)
    error = models.TextField(blank=True)
    skip_reason = models.CharField(max_length=200, blank=True)
    # Flow control: the node's priority (0 low, 1 normal, 2 high) for load shedding; why the
    # model that served the step was chosen, when it was not simply the one asked for; and,
    # while the step is back in the queue waiting for a model, why.
    priority = models.SmallIntegerField(default=1)
    route = models.TextField(blank=True)
    waiting = models.TextField(blank=True)

    class Meta(TenantModel.Meta):
        ordering = ["created_at", "node_id", "item_index"]
        indexes = [
            models.Index(fields=["run", "status"], name="step_run_status"),
            # The sweeper's two questions: expired leases, and queued steps gone quiet.
            models.Index(
                fields=["lease_until"],
                name="step_running_lease",
                condition=models.Q(status="running"),
            ),
            models.Index(
                fields=["enqueued_at"],
                name="step_waiting_enqueued",
                condition=models.Q(status__in=["queued", "failed"]),
            ),
            # Admission control counts a tenant's waiting steps on every submission.
            models.Index(
                fields=["tenant"],
                name="step_waiting_tenant",
                condition=models.Q(status__in=["queued", "failed"]),
            ),
        ]

    def __str__(self) -> str:
        return f"step {self.node_id} {self.id}"


class Event(TenantModel):
    """An immutable piece of data: a run's input or a step's output. A trigger refuses UPDATE."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="events")
    producer = models.ForeignKey(
        Step, null=True, blank=True, on_delete=models.CASCADE, related_name="outputs"
    )
    seq = models.PositiveIntegerField(default=0)
    node_id = models.CharField(max_length=64)
    port = models.CharField(max_length=64, default="out")
    key = models.CharField(max_length=200, blank=True)
    payload = models.JSONField()
    event_time = models.DateTimeField()
    # Open fan-outs this event is inside, outermost first:
    # [[fan-out step id, item index, fan-out node id], ...]
    scopes = models.JSONField(default=list)
    # Events a stream segment writes have no step (the segment's cheap nodes run in the
    # Kafka worker's micro-batch): `parent` is the record's own event they came from, and
    # `origin` where the record came from ("<topic>:<partition>:<offset>", or a webhook or
    # schedule tick's id).
    parent = models.UUIDField(null=True, blank=True)
    origin = models.CharField(max_length=300, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta(TenantModel.Meta):
        ordering = ["created_at", "seq"]
        constraints = [
            # A step's outputs can be committed once only: a second commit collides here.
            models.UniqueConstraint(fields=["producer", "seq"], name="event_output_once")
        ]

    def __str__(self) -> str:
        return f"event {self.id}"


class FanInClosed(models.TextChoices):
    OPEN = ""
    COLLECTED = "collected"  # the collect step was created with what arrived
    PASSED = "passed"  # no collect: its unit went back to the outer scope
    FAILED = "failed"  # items failed and the policy fails the run: no collect step


class FanIn(TenantModel):
    """Counts what is still in flight inside one fan-out, so its collect fires exactly when
    every item has settled: arrived at the collect, or ended (sunk, routed away, dead)."""

    fanout_step = models.OneToOneField(Step, primary_key=True, on_delete=models.CASCADE)
    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="+")
    collect_node_id = models.CharField(max_length=64, blank=True)
    # The fan-out step's own scopes: the collect's output goes back to them.
    parent_scopes = models.JSONField(default=list)
    pending = models.IntegerField(default=0)
    # Items that failed inside this scope (dead or past their deadline).
    failed = models.IntegerField(default=0)
    closed = models.CharField(max_length=16, choices=FanInClosed.choices, blank=True)
    # Set when closed as collected: the collect step, and the failures it was told of.
    collect_step = models.OneToOneField(
        Step, null=True, blank=True, on_delete=models.SET_NULL, related_name="collected_fanin"
    )
    failures = models.JSONField(default=list, blank=True)


class FanInArrival(TenantModel):
    """An event that reached a fan-out's collect. One row per arrival rather than an array
    on FanIn, so a 20,000-item fan-out appends rows instead of rewriting a growing array."""

    fanin = models.ForeignKey(FanIn, on_delete=models.CASCADE, related_name="arrivals")
    event = models.OneToOneField(Event, on_delete=models.CASCADE, related_name="+")


class ResultRow(TenantModel):
    """A row written by a sink.table step, or by a sink.table node inside a stream segment.
    One per sink step, or per (record, node) of a segment: the unique step or effect key
    makes a repeated commit impossible rather than unlikely."""

    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="result_rows")
    step = models.OneToOneField(
        Step, null=True, blank=True, on_delete=models.CASCADE, related_name="result_row"
    )
    effect_key = models.CharField(max_length=200, null=True, blank=True, unique=True)
    table = models.CharField(max_length=64, db_index=True)
    data = models.JSONField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta(TenantModel.Meta):
        ordering = ["created_at"]


class EffectStatus(models.TextChoices):
    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"


class Effect(TenantModel):
    """The side-effect ledger: one row per effect key, so an effect is performed once.
    The key is derived from run, node, input events and effect name, so it is the same on
    every attempt of the step; it is also the Idempotency-Key sent with HTTP calls."""

    key = models.CharField(max_length=200, unique=True)
    step = models.ForeignKey(Step, on_delete=models.CASCADE, related_name="effects")
    kind = models.CharField(max_length=64)
    request_digest = models.CharField(max_length=64)
    status = models.CharField(max_length=16, choices=EffectStatus.choices)
    result = models.JSONField(null=True, blank=True)
    # Times the call went out: above 1 means a retry after an unknown outcome, which the
    # receiver deduplicates by the idempotency key.
    calls = models.PositiveIntegerField(default=0)
    error = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    completed_at = models.DateTimeField(null=True, blank=True)


class Usage(TenantModel):
    """What one attempt of a step consumed: tokens (prompt, completion, and of those the
    wasted ones generated after a stop), engine time and cost, per tenant, run, step, model.
    Written however the attempt ended: a stopped generation was still paid for."""

    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="usage")
    step = models.ForeignKey(Step, null=True, on_delete=models.CASCADE, related_name="usage")
    model = models.CharField(max_length=100)
    engine = models.CharField(max_length=32)
    tokens_in = models.PositiveIntegerField(default=0)
    tokens_out = models.PositiveIntegerField(default=0)
    wasted_tokens = models.PositiveIntegerField(default=0)
    engine_seconds = models.FloatField(default=0.0)
    cost_usd = models.DecimalField(max_digits=12, decimal_places=6, default=Decimal(0))
    stop_latency_ms = models.FloatField(null=True, blank=True)
    at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta(TenantModel.Meta):
        verbose_name_plural = "usage"


class StreamRelay(TenantModel):
    """The outbox from a stream run's steps back into its stream segment: a step whose output
    feeds a window or memory node (classify with an LLM, then count per category) writes one
    row per output in its commit. The deployment's Kafka worker produces it to the
    deployment's relay topic, keyed by the node's key, and takes it from there like a
    source record; the transaction that takes it deletes the row, so a copy produced twice
    is taken once."""

    id = models.BigAutoField(primary_key=True)
    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="+")
    node_id = models.CharField(max_length=64)  # the stateful node the event enters at
    event = models.UUIDField()  # the step's output event
    key = models.CharField(max_length=200, blank=True)
    payload = models.JSONField()
    event_time = models.DateTimeField()
    # When a worker last produced it to the relay topic (acknowledged); None: not yet.
    sent_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta(TenantModel.Meta):
        indexes = [models.Index(fields=["run", "sent_at"], name="relay_unsent")]
