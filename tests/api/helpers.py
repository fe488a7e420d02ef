"""API test helpers: a client that sends an API key, and specs that validate."""

import json
from collections.abc import Iterable
from typing import Any

from django.test import Client

from apps.tenants.api_keys import create_api_key
from apps.tenants.keys import SCOPES
from apps.tenants.models import Tenant
from tests.conftest import World
from tests.web.test_pages import SCHEMA_SPEC, SPEC

__all__ = ["SCHEMA_SPEC", "SPEC", "ApiClient", "key_client"]


class ApiClient:
    """JSON in, JSON out, with `Authorization: Bearer <key>` on every request."""

    def __init__(self, secret: str | None) -> None:
        self.client = Client()
        self.headers = {"authorization": f"Bearer {secret}"} if secret else {}

    def get(self, path: str, **params: Any) -> Any:
        return self.client.get(path, params, headers=self.headers)

    def post(self, path: str, body: Any = None, headers: dict[str, str] | None = None) -> Any:
        return self.client.post(
            path,
            json.dumps(body if body is not None else {}),
            content_type="application/json",
            headers={**self.headers, **(headers or {})},
        )


def key_client(
    world: World, scopes: Iterable[str] = SCOPES, tenant: Tenant | None = None
) -> ApiClient:
    _, secret = create_api_key(
        tenant=tenant or world.acme, name="test key", scopes=list(scopes), actor=world.owner
    )
    return ApiClient(secret)
