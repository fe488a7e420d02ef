"""Writing what a step produced, inside the step's commit transaction."""

from datetime import datetime
from typing import Any
from uuid import UUID

from django.db.models import F
from django.utils import timezone

from apps.runs.engine import store
from apps.runs.engine.effects import digest, effect_key
from apps.runs.models import Effect, EffectStatus, Event, ResultRow, Run, RunKind, Step, Usage
from workers.operators.base import StepResult, UsageRecord


def shared_key(inputs: list[Event] | None) -> str:
    """The key a step's outputs carry: its inputs' key when they all share one (a stream's
    partition key, a batch item's index), so results can be traced to what fed them
    without walking the lineage."""
    keys = {event.key for event in inputs or ()}
    return keys.pop() if len(keys) == 1 else ""


def stream_event_time(run: Run, inputs: list[Event] | None) -> datetime | None:
    """In a stream run, a step's outputs keep their inputs' event time (the latest of them):
    a window after an LLM step counts a ticket by when it happened, not by when the model
    answered. Elsewhere (None) outputs are timed when they are made."""
    if run.kind != RunKind.STREAM or not inputs:
        return None
    return max(event.event_time for event in inputs)


def output_events(
    step: Step,
    run: Run,
    result: StepResult,
    *,
    opens_scope: bool,
    key: str = "",
    event_time: datetime | None = None,
) -> list[Event]:
    """The step's output events, not yet saved: a chain runs the next step on them first."""
    now = event_time or timezone.now()
    return [
        Event(
            tenant_id=run.tenant_id,
            run=run,
            producer=step,
            seq=seq,
            node_id=step.node_id,
            port=output.port,
            key=key,
            payload=output.payload,
            event_time=now,
            # A fan-out's outputs are the items of a new scope opened by this step.
            scopes=[*step.scopes, [str(step.id), seq, step.node_id]]
            if opens_scope
            else step.scopes,
        )
        for seq, output in enumerate(result.outputs)
    ]


def save_outputs(step: Step, run: Run, events: list[Event], result: StepResult) -> None:
    store.create_rows(events)
    for table, row in result.table_rows:
        write_table_row(step, run, table, row)


def record_usage(
    step_id: UUID, run: Run, usage: UsageRecord, *, on_step: bool = True
) -> dict[str, Any]:
    """Writes one attempt's Usage row; returns the step's fields that add it to the step's
    totals, for the caller's own step transition (empty when `on_step` is False)."""
    Usage.objects.create(
        tenant_id=run.tenant_id,
        run=run,
        step_id=step_id,
        model=usage.model,
        engine=usage.engine,
        tokens_in=usage.tokens_in,
        tokens_out=usage.tokens_out,
        wasted_tokens=usage.wasted_tokens,
        engine_seconds=usage.engine_seconds,
        cost_usd=usage.cost_usd,
        stop_latency_ms=usage.stop_latency_ms,
    )
    if not on_step:
        return {}
    fields: dict[str, Any] = {
        "model": usage.model,
        "tokens_in": F("tokens_in") + usage.tokens_in,
        "tokens_out": F("tokens_out") + usage.tokens_out,
        "wasted_tokens": F("wasted_tokens") + usage.wasted_tokens,
        "cost_usd": F("cost_usd") + usage.cost_usd,
    }
    if usage.stop_latency_ms is not None:
        fields["stop_latency_ms"] = usage.stop_latency_ms
    fields["route"] = usage.route
    return fields


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
