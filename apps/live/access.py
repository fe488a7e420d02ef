"""Who is following a run's feed, and whether that run is theirs. The same answer for the
WebSocket and the SSE endpoint: a bearer API key with `runs:read` when the request carries
one (then the session is ignored, so a page's cookie never widens a key), else the signed-in
user's membership. Another tenant's run and a missing one look the same: None."""

from dataclasses import dataclass
from typing import Any
from uuid import UUID

from apps.runs.models import Run
from apps.tenants.context import tenant_context
from apps.tenants.keys import RUNS_READ, key_for_bearer
from apps.tenants.middleware import membership_for_user
from apps.tenants.models import Tenant


@dataclass(frozen=True)
class Follower:
    tenant: Tenant
    label: str  # for logs: a username or a key prefix, never a secret


@dataclass(frozen=True)
class FollowedRun:
    id: UUID
    tenant_id: int
    status: str
    on_disconnect: str


def follower(authorization: str | None, user: Any, session_tenant: object) -> Follower | None:
    if authorization is not None:
        key = key_for_bearer(authorization, scope=RUNS_READ)
        return Follower(key.tenant, f"key {key.prefix}") if key else None
    membership = membership_for_user(user, session_tenant)
    if membership is None:
        return None
    return Follower(membership.tenant, user.get_username())


def followed_run(who: Follower, run_id: UUID) -> FollowedRun | None:
    with tenant_context(who.tenant):
        row = (
            Run.objects.filter(id=run_id)
            .values_list("id", "tenant_id", "status", "on_disconnect")
            .first()
        )
    return FollowedRun(*row) if row else None


def run_for(
    authorization: str | None, user: Any, session_tenant: object, run_id: UUID
) -> tuple[str, FollowedRun | None]:
    """("ok", run), or ("unauthorized" | "not_found", None): one answer for both transports."""
    who = follower(authorization, user, session_tenant)
    if who is None:
        return "unauthorized", None
    run = followed_run(who, run_id)
    return ("ok", run) if run else ("not_found", None)


def parse_after(raw: str | None) -> int | None:
    """A cursor from the client: a non-negative integer, absent meaning 0; None if bad."""
    if raw is None or raw == "":
        return 0
    return int(raw) if raw.isdigit() else None


def header(headers: list[tuple[bytes, bytes]], name: bytes) -> str | None:
    """An ASGI scope's header, decoded; None when absent."""
    for key, value in headers:
        if key.lower() == name:
            return value.decode("latin-1")
    return None
