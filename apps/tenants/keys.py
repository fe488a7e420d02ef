"""API keys presented as `Authorization: Bearer sk_<prefix>_<secret>`: the key's tenant,
if the key exists, is not revoked, matches, and carries the scope asked for."""

import hmac
from datetime import timedelta

from django.utils import timezone

from apps.tenants.models import API_KEY_PREFIX_LEN, ApiKey, hash_api_secret

# Scopes a key may carry. SCOPES is the one list the key form offers and the service checks.
GRAPHS_READ = "graphs:read"
GRAPHS_WRITE = "graphs:write"
RUNS_READ = "runs:read"
RUNS_WRITE = "runs:write"
EVENTS_WRITE = "events:write"
SCOPES: dict[str, str] = {
    GRAPHS_READ: "List graphs and read their versions.",
    GRAPHS_WRITE: "Create graphs and add versions.",
    RUNS_READ: "Read runs, their steps and results; follow a run's live events.",
    RUNS_WRITE: "Start and cancel runs.",
    EVENTS_WRITE: "Send events into a graph's source.",
}
# last_used_at is a hint for people, not an audit: written at most this often per key.
LAST_USED_RESOLUTION = timedelta(minutes=1)


def key_for_bearer(authorization: str, *, scope: str) -> ApiKey | None:
    key = key_for_authorization(authorization)
    return key if key is not None and scope in key.scopes else None


def key_for_authorization(authorization: str) -> ApiKey | None:
    """The live key a `Bearer` header presents, whatever its scopes; None if there is none."""
    kind, _, secret = authorization.strip().partition(" ")
    secret = secret.strip()
    if kind.lower() != "bearer" or not secret.startswith("sk_"):
        return None
    prefix = secret[3 : 3 + API_KEY_PREFIX_LEN]
    # Before any tenant is known: the unscoped manager, by the key's own prefix.
    key = (
        ApiKey.unscoped_all_tenants.select_related("tenant")
        .filter(prefix=prefix, revoked_at__isnull=True)
        .first()
    )
    if key is None or not hmac.compare_digest(key.hashed_secret, hash_api_secret(secret)):
        return None
    now = timezone.now()
    if key.last_used_at is None or now - key.last_used_at > LAST_USED_RESOLUTION:
        ApiKey.unscoped_all_tenants.filter(pk=key.pk).update(last_used_at=now)
    return key
