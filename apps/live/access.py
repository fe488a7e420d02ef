"""Who is following a run's feed, and whether that run is theirs. The same answer for the
WebSocket and the SSE endpoint: a bearer API key with `runs:read` when the request carries
one (then the session is ignored, so a page's cookie never widens a key), else the signed-in
user's membership. Another tenant's run and a missing one look the same: None."""

from dataclasses import dataclass
from typing import Any
from uuid import UUID

from apps.runs.models import ACTIVE_RUN_STATUSES, Run
from apps.tenants.context import tenant_context
from apps.tenants.keys import RUNS_READ, key_for_bearer
from apps.tenants.middleware import membership_for_user
from apps.tenants.models import Tenant


@dataclass(frozen=True)
class FollowedRun:
    id: UUID
    status: str
    on_disconnect: str
    tenant_id: int

    @property
    def cancels_when_left(self) -> bool:
        """Whether its viewers count: closing the last one cancels the run."""
        return self.on_disconnect == "cancel" and self.status in ACTIVE_RUN_STATUSES


def follower(authorization: str | None, user: Any, session_tenant: object) -> Tenant | None:
    """The tenant whose runs these credentials may follow: a key's, or the member's."""
    if authorization is not None:
        key = key_for_bearer(authorization, scope=RUNS_READ)
        return key.tenant if key else None
    membership = membership_for_user(user, session_tenant)
    return membership.tenant if membership else None


def followed_run(tenant: Tenant, run_id: UUID) -> FollowedRun | None:
    with tenant_context(tenant):
        row = (
            Run.objects.filter(id=run_id)
            .values_list("id", "status", "on_disconnect", "tenant_id")
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


# Frame numbers are PostgreSQL bigints and Redis stream ids: a larger cursor is no cursor.
MAX_SEQ = 2**63 - 1


def parse_after(raw: str | None) -> int | None:
    """A cursor from the client: a non-negative integer, absent meaning 0; None if bad."""
    if raw is None or raw == "":
        return 0
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 19 or int(raw) > MAX_SEQ:
        return None
    return int(raw)


def header(headers: list[tuple[bytes, bytes]], name: bytes) -> str | None:
    """An ASGI scope's header, decoded; None when absent."""
    for key, value in headers:
        if key.lower() == name:
            return value.decode("latin-1")
    return None
