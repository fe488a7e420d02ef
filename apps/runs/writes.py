"""Writing what a step produced, inside the step's commit transaction."""

from typing import Any

from django.utils import timezone

from apps.runs.effects import digest, effect_key
from apps.runs.models import Effect, EffectStatus, Event, ResultRow, Run, Step, Usage
from workers.operators.base import StepResult


def write_outputs(step: Step, run: Run, result: StepResult, *, opens_scope: bool) -> list[Event]:
    now = timezone.now()
    events = [
        Event(
            tenant_id=run.tenant_id,
            run=run,
            producer=step,
            seq=seq,
            node_id=step.node_id,
            port=output.port,
            payload=output.payload,
            event_time=now,
            # A fan-out's outputs are the items of a new scope opened by this step.
            scopes=[*step.scopes, [str(step.id), seq, step.node_id]]
            if opens_scope
            else step.scopes,
        )
        for seq, output in enumerate(result.outputs)
    ]
    Event.objects.bulk_create(events)
    for table, row in result.table_rows:
        write_table_row(step, run, table, row)
    if result.usage is not None:
        u = result.usage
        Usage.objects.create(
            tenant_id=run.tenant_id,
            run=run,
            step=step,
            model=u.model,
            engine=u.engine,
            tokens_in=u.tokens_in,
            tokens_out=u.tokens_out,
            engine_seconds=u.engine_seconds,
            cost_usd=u.cost_usd,
        )
    return events


def write_table_row(step: Step, run: Run, table: str, row: dict[str, Any]) -> None:
    """The row and its ledger entry commit with the step: both exist once or not at all."""
    result_row = ResultRow.objects.create(
        tenant_id=run.tenant_id, run=run, step=step, table=table, data=row
    )
    Effect.objects.create(
        tenant_id=run.tenant_id,
        key=effect_key(run.id, step.node_id, step.inputs, f"sink.table:{table}"),
        step=step,
        kind="sink.table",
        request_digest=digest(row),
        status=EffectStatus.DONE,
        result={"row_id": result_row.pk},
        completed_at=timezone.now(),
    )
