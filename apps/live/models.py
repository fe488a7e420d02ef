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
