"""The API keys page: editors see the list, owners create keys (the secret shown once, never
stored, logged or shown again) and revoke them; a revoked key no longer authenticates."""

import re

import pytest
from django.test import Client
from django.urls import reverse

from apps.audit.models import AuditEntry
from apps.tenants.api_keys import create_api_key
from apps.tenants.keys import SCOPES, key_for_bearer
from apps.tenants.models import ApiKey
from apps.tenants.services import Refused
from apps.tenants.views import NEW_KEY_SESSION_KEY
from tests.conftest import World
from tests.tenants.test_self_service import audit, field_errors, state
from tests.web.test_pages import sign_in, text

pytestmark = pytest.mark.django_db

SECRET_INPUT = re.compile(r'<input type="text" id="new-key-secret" class="code" value="([^"]+)"')


def test_editors_see_the_list_without_controls_and_an_empty_state(
    client: Client, world: World
) -> None:
    body = text(sign_in(client, world.editor).get(reverse("tenants:keys")))
    assert "No API keys yet" in body and "Owners of Acme can create them." in body
    assert "Creating and revoking keys needs the owner role; you are editor." in body
    assert 'name="scopes"' not in body
    create_api_key(tenant=world.acme, name="nightly", scopes=["runs:read"], actor=world.owner)
    create_api_key(tenant=world.globex, name="theirs", scopes=["runs:read"], actor="test")
    body = text(client.get(reverse("tenants:keys")))
    assert "nightly" in body and "theirs" not in body
    assert "Revoke" not in body


def test_the_form_offers_every_known_scope_with_its_description(
    client: Client, world: World
) -> None:
    body = text(sign_in(client, world.owner).get(reverse("tenants:keys")))
    offered = re.findall(r'<input type="checkbox" name="scopes" value="([^"]+)"', body)
    assert offered == list(SCOPES)
    assert {"runs:read", "graphs:read", "graphs:write", "runs:write", "events:write"} == set(SCOPES)
    for about in SCOPES.values():
        assert about in body


def test_owner_creates_a_key_whose_secret_is_shown_once_and_works(
    client: Client, world: World
) -> None:
    sign_in(client, world.owner)
    created = client.post(
        reverse("tenants:create_key"), {"name": "nightly import", "scopes": ["runs:read"]}
    )
    # Post/redirect/get: reloading the page that shows the secret creates nothing.
    assert created.status_code == 302 and created["Location"] == reverse("tenants:keys")
    waiting = client.session[NEW_KEY_SESSION_KEY]["secret"]  # encrypted while it waits
    response = client.get(created["Location"])
    assert NEW_KEY_SESSION_KEY not in client.session
    assert response.status_code == 200
    body = text(response)
    shown = SECRET_INPUT.search(body)
    assert shown is not None
    secret = shown[1]
    assert secret not in waiting and secret[12:] not in waiting
    assert "it will not be shown again" in body
    assert 'data-copy="#new-key-secret"' in body
    assert "no-store" in response["Cache-Control"]

    key = ApiKey.unscoped_all_tenants.get()
    assert secret.startswith(f"sk_{key.prefix}_")
    assert (key.name, key.scopes, key.created_by_id) == (
        "nightly import",
        ["runs:read"],
        world.owner.pk,
    )
    assert secret not in str(ApiKey.unscoped_all_tenants.values().get())
    [entry] = audit(world.acme, "api_key.create")
    assert entry.after == {"name": "nightly import", "prefix": key.prefix, "scopes": ["runs:read"]}
    assert secret not in str(list(AuditEntry.unscoped_all_tenants.values()))
    assert secret[len(f"sk_{key.prefix}_") :] not in str(
        list(AuditEntry.unscoped_all_tenants.values())
    )

    assert secret not in text(client.get(reverse("tenants:keys")))  # shown once only
    assert ApiKey.unscoped_all_tenants.count() == 1

    row_of = re.compile(rf'<tr data-key="{key.prefix}">(.*?)</tr>', re.S)
    row = row_of.search(text(client.get(reverse("tenants:keys"))))
    assert row is not None
    assert f"<code>sk_{key.prefix}_…</code>" in row[1]
    assert '<span class="tag">runs:read</span>' in row[1]
    assert "by owner" in row[1] and '<span class="muted">never</span>' in row[1]
    assert '<span class="badge badge-done">active</span>' in row[1]

    found = key_for_bearer(f"Bearer {secret}", scope="runs:read")
    assert found is not None and found.pk == key.pk and found.tenant_id == world.acme.pk
    assert key_for_bearer(f"Bearer {secret}", scope="runs:write") is None  # not its scope
    later = text(client.get(reverse("tenants:keys")))
    used = row_of.search(later)
    assert used is not None and "never" not in used[1]
    for name in ["tenants:keys", "tenants:members", "tenants:settings", "graphs:list"]:
        assert secret not in text(client.get(reverse(name)))


def test_owner_revokes_a_key_and_it_stops_working(client: Client, world: World) -> None:
    key, secret = create_api_key(
        tenant=world.acme, name="ci", scopes=["runs:read"], actor=world.owner
    )
    assert key_for_bearer(f"Bearer {secret}", scope="runs:read") is not None
    sign_in(client, world.owner)
    page = text(client.get(reverse("tenants:keys")))
    assert f'action="{reverse("tenants:revoke_key", args=[key.pk])}"' in page
    assert "data-confirm=" in page
    response = client.post(reverse("tenants:revoke_key", args=[key.pk]), follow=True)
    assert response.redirect_chain == [(reverse("tenants:keys"), 302)]
    body = text(response)
    assert "The key “ci” was revoked; it no longer works." in body
    row = re.search(rf'<tr data-key="{key.prefix}" class="is-revoked">(.*?)</tr>', body, re.S)
    assert row is not None and "revoked" in row[1] and "Revoke" not in row[1]
    key.refresh_from_db()
    assert key.revoked_at is not None
    assert key_for_bearer(f"Bearer {secret}", scope="runs:read") is None
    [entry] = audit(world.acme, "api_key.revoke")
    assert entry.actor_id == world.owner.pk
    assert entry.before == {"name": "ci", "prefix": key.prefix, "revoked_at": None}
    assert entry.after == {
        "name": "ci",
        "prefix": key.prefix,
        "revoked_at": key.revoked_at.isoformat(),
    }

    before = state()
    again = client.post(reverse("tenants:revoke_key", args=[key.pk]), follow=True)
    assert "The key “ci” was revoked already." in text(again)
    assert state() == before


@pytest.mark.parametrize(
    ("data", "field", "message"),
    [
        ({"name": "", "scopes": ["runs:read"]}, "name", "This field is required."),
        ({"name": "   ", "scopes": ["runs:read"]}, "name", "This field is required."),
        ({"name": "x" * 101, "scopes": ["runs:read"]}, "name", "at most 100 characters"),
        ({"name": "ok"}, "scopes", "Choose at least one scope."),
        ({"name": "ok", "scopes": ["admin:all"]}, "scopes", "Select a valid choice."),
    ],
)
def test_bad_keys_are_refused_on_the_field(
    client: Client, world: World, data: dict[str, object], field: str, message: str
) -> None:
    before = state()
    response = sign_in(client, world.owner).post(reverse("tenants:create_key"), data)
    assert response.status_code == 400
    assert message in field_errors(text(response), field)
    assert 'id="new-key-secret"' not in text(response)
    assert state() == before


def test_the_service_checks_scopes_and_name_for_every_caller(world: World) -> None:
    before = state()
    with pytest.raises(Refused) as refused:
        create_api_key(tenant=world.acme, name=" ", scopes=["root"], actor="test")
    assert refused.value.errors == {
        "name": ["Give the key a name, e.g. where it is used."],
        "scopes": ["Unknown scope: root."],
    }
    assert state() == before
    key, _ = create_api_key(
        tenant=world.acme, name="k", scopes=["runs:write", "graphs:read", "runs:write"], actor="t"
    )
    assert key.scopes == ["graphs:read", "runs:write"]  # deduplicated, in the list's order
