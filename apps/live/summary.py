"""What a pruned run's feed says (apps/live/retention.py prunes): one `pruned` frame,
numbered like the run's last frame, with the run's status, error and final outputs. It is
built when asked, from rows the run keeps anyway, so pruning stores nothing but `last_seq`.

Reads go through the unscoped managers: the feed's readers have already checked that the
follower may see this run (apps/live/access.py), and hold no tenant context here."""

import json
from typing import Any
from uuid import UUID

from apps.live.models import PrunedFeed
from apps.runs.models import Event

# A run with more outputs than this is summed up by its first ones; the run page has them all.
MAX_OUTPUTS = 50


def pruned_summary(run_id: UUID | str, after: int) -> list[tuple[int, str]] | None:
    """The run's feed after `after` when it was pruned: its summary frame, or nothing once the
    follower has seen it. None when the run was not pruned, or was replayed since (active
    again, or finished after the pruning): then its feed is its frames, as for any run."""
    pruned = (
        PrunedFeed.unscoped_all_tenants.filter(run_id=run_id)
        .select_related("run__graph_version", "tenant")
        .defer("run__input")
        .first()
    )
    if pruned is None or pruned.run.is_active or _finished_after(pruned):
        return None
    if after >= pruned.last_seq:
        return []
    return [(pruned.last_seq, json.dumps(summary_frame(pruned), separators=(",", ":")))]


def _finished_after(pruned: PrunedFeed) -> bool:
    finished_at = pruned.run.finished_at
    return finished_at is not None and finished_at > pruned.pruned_at


def is_summary(text: str) -> bool:
    return bool(json.loads(text).get("type") == "pruned")


def summary_frame(pruned: PrunedFeed) -> dict[str, Any]:
    run, days = pruned.run, pruned.tenant.feed_retention_days
    outputs, truncated = final_outputs(run.id, run.graph_version.spec)
    said = "Its final outputs follow." if outputs else "Its terminal steps produced no outputs."
    return {
        "seq": pruned.last_seq,
        "type": "pruned",
        "at": round(pruned.pruned_at.timestamp(), 3),
        "status": run.status,
        "error": run.error,
        "outputs": outputs,
        "outputs_truncated": truncated,
        "retention_days": days,
        "detail": f"This run finished more than {days} day{'' if days == 1 else 's'} ago; its "
        f"token frames were pruned after the tenant's retention. {said}",
    }


def terminal_nodes(spec: dict[str, Any]) -> list[str]:
    """Nodes no edge leaves: what the run ends with (edges are [from, to] or [from, to, port])."""
    sources = {edge[0] for edge in spec.get("edges", [])}
    return [node["id"] for node in spec.get("nodes", []) if node["id"] not in sources]


def final_outputs(run_id: UUID, spec: dict[str, Any]) -> tuple[list[dict[str, Any]], bool]:
    """The payloads the terminal nodes' steps produced, as stored, in the order they were
    committed (at most MAX_OUTPUTS), and whether there were more."""
    rows = (
        Event.unscoped_all_tenants.filter(
            run_id=run_id, producer__isnull=False, node_id__in=terminal_nodes(spec)
        )
        .order_by("created_at", "seq")
        .values_list("node_id", "payload")[: MAX_OUTPUTS + 1]
    )
    outputs = [{"node": node, "payload": payload} for node, payload in rows]
    return outputs[:MAX_OUTPUTS], len(outputs) > MAX_OUTPUTS
