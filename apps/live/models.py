from django.db import models

from apps.runs.models import Run
from apps.tenants.models import TenantModel


class RunFrame(TenantModel):
    """One frame of a run's feed as persisted for replay. Frames are numbered and published
    through Redis first (apps/live/publisher.py) and written here in batches, so a token
    costs no database write; `body` is the frame's JSON exactly as it was sent."""

    id = models.BigAutoField(primary_key=True)
    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="+")
    seq = models.PositiveBigIntegerField()
    kind = models.CharField(max_length=16)
    body = models.TextField()

    class Meta(TenantModel.Meta):
        constraints = [models.UniqueConstraint(fields=["run", "seq"], name="run_frame_seq_once")]

    def __str__(self) -> str:
        return f"frame {self.seq} of run {self.run_id}"


class PrunedFeed(TenantModel):
    """A finished run whose frames were pruned after its tenant's feed retention
    (apps/live/retention.py). Written before the first frame is deleted; from then on the
    run's feed is one summary frame numbered `last_seq` (apps/live/summary.py)."""

    run = models.OneToOneField(Run, on_delete=models.CASCADE, related_name="+")
    last_seq = models.PositiveBigIntegerField()
    pruned_at = models.DateTimeField()

    def __str__(self) -> str:
        return f"pruned feed of run {self.run_id} (up to frame {self.last_seq})"


class PruneCursor(TenantModel):
    """How far the sweeper has walked a tenant's finished runs, in (finished_at, run id)
    order: every run before this point has had its frames pruned (or had none). A pass
    starts here, so finding nothing to do costs one index probe per tenant, not a scan of
    every run ever finished. `run_id` is no foreign key: deleting that run must not reset
    the walk."""

    finished_at = models.DateTimeField()
    run_id = models.UUIDField()

    class Meta(TenantModel.Meta):
        constraints = [models.UniqueConstraint(fields=["tenant"], name="prune_cursor_per_tenant")]

    def __str__(self) -> str:
        return f"pruned up to {self.finished_at.isoformat()} (run {self.run_id})"
