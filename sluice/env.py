"""Typed readers for settings that come from environment variables.

Each helper raises ImproperlyConfigured naming the variable and what was expected,
so a typo in a deployment fails at start-up with a message that says what to fix.
"""

import json
import os
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

from django.core.exceptions import ImproperlyConfigured


def env_str(name: str, default: str) -> str:
    return os.environ.get(name, default)


def env_int(name: str, default: int, *, minimum: int = 0) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ImproperlyConfigured(f"{name} must be at least {minimum}, got {value}")
    return value


def env_float(name: str, default: float, *, minimum: float = 0.0) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be a number, got {raw!r}") from None
    if value < minimum:
        raise ImproperlyConfigured(f"{name} must be at least {minimum}, got {value}")
    return value


def env_json_object(name: str) -> dict[str, Any]:
    """A JSON object given inline, or as `@/path/to/file.json`; empty when unset."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return {}
    source = raw
    if raw.startswith("@"):
        try:
            source = Path(raw[1:]).read_text()
        except OSError as exc:
            raise ImproperlyConfigured(f"{name}: cannot read {raw[1:]}: {exc.strerror}") from None
    try:
        value = json.loads(source)
    except ValueError as exc:
        raise ImproperlyConfigured(f"{name} must be a JSON object: {exc}") from None
    if not isinstance(value, dict):
        raise ImproperlyConfigured(f"{name} must be a JSON object, got {type(value).__name__}")
    return value


def env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    lowered = raw.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ImproperlyConfigured(f"{name} must be true or false (1/0), got {raw!r}")


def database_from_url(url: str, *, name: str = "DATABASE_URL") -> dict[str, object]:
    """Django DATABASES entry from postgresql://user:pass@host:port/db?host=/socket/dir."""
    parsed = urlparse(url)
    if parsed.scheme not in {"postgres", "postgresql"}:
        raise ImproperlyConfigured(
            f"{name} must start with postgresql://, got scheme {parsed.scheme!r}"
        )
    dbname = unquote(parsed.path.lstrip("/"))
    if not dbname:
        raise ImproperlyConfigured(f"{name} must name a database, e.g. postgresql://host/sluice")
    query = parse_qs(parsed.query)
    host = query.get("host", [unquote(parsed.hostname or "")])[0]
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": dbname,
        "USER": unquote(parsed.username or "postgres"),
        "PASSWORD": unquote(parsed.password or ""),
        "HOST": host,
        "PORT": str(parsed.port or ""),
        "CONN_MAX_AGE": 0,
        "ATOMIC_REQUESTS": False,
    }


def redis_url_with_db(url: str, db: int) -> str:
    """The same Redis server, another logical database: the broker and the channel layer
    share one server without sharing keys."""
    parsed = urlparse(url)
    if parsed.scheme not in {"redis", "rediss"}:
        raise ImproperlyConfigured(f"REDIS_URL must start with redis://, got {url!r}")
    return parsed._replace(path=f"/{db}").geturl()
