"""The effect ledger: the one way a step's side effect leaves the platform.

`perform` writes the ledger row `pending` before the call and the result after it. The key
is derived from run, node, input events and effect name, so every attempt of a step (a
retry, a re-run after a crash, a replay) computes the same key:
- a `done` effect returns its recorded result without calling out;
- a `pending` one (the last attempt died or failed mid-call: the outcome is unknown) calls
  again with the same key, which HTTP calls send as Idempotency-Key so the receiver can
  deduplicate.
Writes into our own tables need no call: outputs.write_table_row commits the row and a `done`
ledger entry with the step.
"""

import hashlib
import json
from collections.abc import Callable, Sequence
from typing import Any
from uuid import UUID

from django.db import transaction
from django.db.models import F
from django.utils import timezone

from apps.runs.models import Effect, EffectStatus, Step, StepStatus
from workers.operators.base import JSON, LeaseLost, PermanentError


def digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def effect_key(run_id: UUID, node_id: str, inputs: Sequence[UUID | str], name: str) -> str:
    """Stable across attempts; readable enough to find in the ledger (at most 200 chars)."""
    inputs_digest = digest(sorted(str(i) for i in inputs))[:24]
    return f"{run_id}:{node_id}:{name[:64]}:{inputs_digest}"


def perform(step: Step, token: UUID, name: str, request: JSON, call: Callable[[str], JSON]) -> JSON:
    """Runs `call(key)` at most once to completion for this step's effect `name`."""
    key = effect_key(step.run_id, step.node_id, step.inputs, name)
    effect = _begin(step, token, key, name, digest(request))
    if effect.status == EffectStatus.DONE:
        return dict(effect.result or {})
    try:
        result = call(key)
    except PermanentError as exc:
        _finish(effect.pk, EffectStatus.FAILED, None, str(exc))
        raise
    except Exception as exc:
        # Unknown outcome (timeout, 5xx, a dropped connection): stays pending, and the next
        # attempt calls again with the same key.
        _finish(effect.pk, EffectStatus.PENDING, None, f"{type(exc).__name__}: {exc}")
        raise
    _finish(effect.pk, EffectStatus.DONE, result, "")
    return result


def _begin(step: Step, token: UUID, key: str, name: str, request_digest: str) -> Effect:
    with transaction.atomic():
        # A worker that lost its lease must not call out: another one owns the step now.
        if not Step.objects.filter(
            id=step.id, status=StepStatus.RUNNING, lease_token=token
        ).exists():
            raise LeaseLost(str(step.id))
        Effect.objects.bulk_create(
            [
                Effect(
                    tenant_id=step.tenant_id,
                    key=key,
                    step=step,
                    kind=name,
                    request_digest=request_digest,
                    status=EffectStatus.PENDING,
                )
            ],
            ignore_conflicts=True,  # the row from an earlier attempt wins
        )
        effect = Effect.objects.select_for_update().get(key=key)
        if effect.status == EffectStatus.DONE:
            return effect
        if effect.request_digest != request_digest:
            raise PermanentError(
                f"effect {name!r} was first attempted with a different request; an effect's"
                " request must be the same on every attempt (is the template time-dependent?)"
            )
        Effect.objects.filter(pk=effect.pk).update(calls=F("calls") + 1)
    return effect


def _finish(pk: int, status: str, result: JSON | None, error: str) -> None:
    completed = timezone.now() if status == EffectStatus.DONE else None
    Effect.objects.filter(pk=pk).update(
        status=status, result=result, error=error[:2000], completed_at=completed
    )
