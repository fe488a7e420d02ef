"""The secrets page: names for every member, writes for owners only (403 for the rest),
404 for another tenant's secret, and no response ever carries a value."""

from typing import Any

import pytest
from django.contrib import admin
from django.contrib.auth import get_user_model
from django.test import Client
from django.urls import reverse

from apps.audit.models import AuditEntry
from apps.secrets.models import Secret
from apps.secrets.services import secret_value
from apps.tenants.context import tenant_context
from tests.conftest import World
from tests.secrets.helpers import add_secret, stored
from tests.web.test_pages import logged_in, sign_in, text

pytestmark = pytest.mark.django_db

VALUE = "sk-live-page-test-31337"
LIST = reverse("secrets:list")


def replace_url(name: str) -> str:
    return reverse("secrets:replace", args=[name])


def delete_url(name: str) -> str:
    return reverse("secrets:delete", args=[name])


def rows(world: World) -> list[tuple[Any, ...]]:
    return list(
        Secret.unscoped_all_tenants.order_by("id").values_list("tenant", "name", "ciphertext")
    )


def test_login_is_required(client: Client, world: World) -> None:
    response = client.get(LIST)
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("login"))
    assert client.post(reverse("secrets:create"), {"name": "a", "value": "b"}).status_code == 302
    assert not Secret.unscoped_all_tenants.exists()


@pytest.mark.parametrize("role", ["owner", "editor", "operator", "viewer"])
def test_every_member_sees_the_names_and_only_owners_see_the_forms(
    client: Client, world: World, role: str
) -> None:
    add_secret(world, "provider-key", VALUE)
    add_secret(world, "globex-only", "globex-value", tenant=world.globex)
    body = text(logged_in(client, world, role).get(LIST))
    assert "provider-key" in body and "owner" in body  # name and who created it
    assert "globex-only" not in body
    assert VALUE not in body
    can_manage = role == "owner"
    assert ('name="value"' in body) is can_manage
    assert (replace_url("provider-key") in body) is can_manage
    assert (delete_url("provider-key") in body) is can_manage
    if not can_manage:
        assert f"needs the owner role; you are {role}" in body


def test_an_empty_list_says_how_to_start(client: Client, world: World) -> None:
    body = text(logged_in(client, world, "owner").get(LIST))
    assert "No secrets yet" in body and 'type="password"' in body
    assert 'autocomplete="new-password"' in body


def test_the_owner_adds_replaces_and_deletes_and_no_page_shows_the_value(
    client: Client, world: World
) -> None:
    owner = logged_in(client, world, "owner")
    bodies = []
    response = owner.post(reverse("secrets:create"), {"name": "api", "value": VALUE}, follow=True)
    assert response.redirect_chain[-1][0] == LIST
    bodies.append(text(response))
    assert "Secret api added." in bodies[-1]
    with tenant_context(world.acme):
        assert secret_value("api") == VALUE

    # A refused add (the name is taken) comes back with the error, not with the value.
    response = owner.post(reverse("secrets:create"), {"name": "api", "value": VALUE})
    assert response.status_code == 400
    bodies.append(text(response))
    assert "already exists" in bodies[-1]

    bodies.append(text(owner.get(replace_url("api"))))
    response = owner.post(replace_url("api"), {"value": "   "})
    assert response.status_code == 400 and "A value is required." in text(response)
    response = owner.post(replace_url("api"), {"value": "sk-rotated-2"}, follow=True)
    bodies.append(text(response))
    assert "The value of api was replaced." in bodies[-1]
    with tenant_context(world.acme):
        assert secret_value("api") == "sk-rotated-2"

    bodies.append(text(owner.get(delete_url("api"))))
    assert "Delete the secret" in bodies[-1] and stored(world.acme, "api") is not None
    response = owner.post(delete_url("api"), follow=True)
    bodies.append(text(response))
    assert "Secret api deleted." in bodies[-1] and stored(world.acme, "api") is None

    for body in bodies:
        assert VALUE not in body and "sk-rotated-2" not in body
    assert [
        e.action
        for e in AuditEntry.unscoped_all_tenants.filter(target_type="secret").order_by("id")
    ] == [
        "secret.create",
        "secret.rotate",
        "secret.delete",
    ]


def test_a_bad_name_is_shown_next_to_the_field(client: Client, world: World) -> None:
    response = logged_in(client, world, "owner").post(
        reverse("secrets:create"), {"name": "Bad Name", "value": VALUE}
    )
    assert response.status_code == 400
    body = text(response)
    assert "Use lowercase letters" in body and 'id="id_name_error"' in body
    assert VALUE not in body
    assert not Secret.unscoped_all_tenants.exists()


@pytest.mark.parametrize("role", ["editor", "operator", "viewer"])
def test_writes_are_forbidden_below_owner(client: Client, world: World, role: str) -> None:
    add_secret(world, "api", VALUE)
    before = rows(world)
    member = logged_in(client, world, role)
    assert member.post(reverse("secrets:create"), {"name": "x", "value": "y"}).status_code == 403
    assert member.get(replace_url("api")).status_code == 403
    assert member.post(replace_url("api"), {"value": "changed"}).status_code == 403
    assert member.get(delete_url("api")).status_code == 403
    assert member.post(delete_url("api")).status_code == 403
    assert rows(world) == before


def test_another_tenants_secret_is_not_found_and_untouched(client: Client, world: World) -> None:
    add_secret(world, "globex-key", "globex-value", tenant=world.globex)
    before = rows(world)
    owner = logged_in(client, world, "owner")
    for response in (
        owner.get(replace_url("globex-key")),
        owner.post(replace_url("globex-key"), {"value": "hijacked"}),
        owner.get(delete_url("globex-key")),
        owner.post(delete_url("globex-key")),
    ):
        assert response.status_code == 404
        assert "Globex" not in text(response)
    assert rows(world) == before
    with tenant_context(world.globex):
        assert secret_value("globex-key") == "globex-value"


def test_the_same_name_in_two_tenants_changes_only_ones_own(client: Client, world: World) -> None:
    add_secret(world, "shared", "acme-value")
    add_secret(world, "shared", "globex-value", tenant=world.globex)
    owner = logged_in(client, world, "owner")
    assert owner.post(replace_url("shared"), {"value": "acme-new"}).status_code == 302
    assert owner.post(delete_url("shared")).status_code == 302
    assert stored(world.acme, "shared") is None
    with tenant_context(world.globex):
        assert secret_value("shared") == "globex-value"


def test_a_user_with_no_membership_gets_404(client: Client, world: World) -> None:
    loner = get_user_model().objects.create_user("loner", password="pw-loner")
    assert sign_in(client, loner).get(LIST).status_code == 404


def test_the_admin_lists_secrets_read_only_without_value_or_ciphertext(world: World) -> None:
    secret = add_secret(world, "api", VALUE)
    staff = get_user_model().objects.create_superuser("root", password="pw-root")
    client = Client()
    client.force_login(staff)
    for url in ("/admin/secrets/secret/", f"/admin/secrets/secret/{secret.pk}/change/"):
        response = client.get(url)
        assert response.status_code == 200, url
        body = text(response)
        assert "api" in body
        assert VALUE not in body and secret.ciphertext not in body and "ciphertext" not in body
    model_admin = admin.site._registry[Secret]
    request = client.get("/admin/").wsgi_request
    assert not model_admin.has_add_permission(request)
    assert not model_admin.has_change_permission(request)
    assert not model_admin.has_delete_permission(request)
