"""Tenant self-service pages: sign-up, creating and switching tenants, members and roles,
quotas and their enforcement when a run starts, the feed's retention, the owner-only writes
(403 for everyone else, 404 across tenants, nothing written), and the htmx answer to an
expired session."""

import re
from decimal import Decimal
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.test import Client
from django.urls import reverse

from apps.audit.models import AuditEntry
from apps.runs.models import Run
from apps.runs.services import InvalidInput, cancel_run, start_run
from apps.tenants.api_keys import create_api_key
from apps.tenants.context import tenant_context
from apps.tenants.middleware import SESSION_TENANT_KEY
from apps.tenants.models import ApiKey, Invitation, Membership, Role, Tenant
from apps.tenants.services import Refused, invite_member, update_settings
from tests.conftest import World
from tests.web.test_pages import SPEC, sign_in, text

pytestmark = pytest.mark.django_db

User = get_user_model()


def audit(tenant: Tenant, action: str) -> list[AuditEntry]:
    return list(
        AuditEntry.unscoped_all_tenants.filter(tenant=tenant, action=action).order_by("at", "pk")
    )


def state() -> dict[str, Any]:
    """Everything a refused write must leave as it was."""
    return {
        "users": User.objects.count(),
        "tenants": sorted(
            Tenant.objects.values_list(
                "slug",
                "monthly_budget_usd",
                "max_active_runs",
                "max_run_budget_usd",
                "feed_retention_days",
            )
        ),
        "memberships": sorted(
            Membership.unscoped_all_tenants.values_list("tenant_id", "user_id", "role")
        ),
        "invites": sorted(
            Invitation.unscoped_all_tenants.values_list("pk", "revoked_at", "accepted_at")
        ),
        "keys": sorted(ApiKey.unscoped_all_tenants.values_list("pk", "revoked_at")),
        "audit": AuditEntry.unscoped_all_tenants.count(),
    }


def field_errors(body: str, field: str) -> str:
    found = re.search(
        rf'<ul class="field-errors" role="alert" id="id_{field}_error">(.*?)</ul>', body, re.S
    )
    assert found is not None, f"no error on {field}"
    return found[1]


def member(world: World, tenant: Tenant, name: str) -> Membership:
    return Membership.unscoped_all_tenants.get(tenant=tenant, user__username=name)


# -- sign-up -----------------------------------------------------------------------------------

SIGNUP = {
    "username": "newbie",
    "email": "newbie@example.com",
    "password": "a long enough passphrase",
    "tenant_name": "Newbie Labs",
}


def test_login_and_signup_pages_link_to_each_other(client: Client, db: None) -> None:
    login = text(client.get(reverse("login")))
    assert f'<a href="{reverse("tenants:signup")}">Create an account</a>' in login
    signup = client.get(reverse("tenants:signup"))
    assert signup.status_code == 200
    body = text(signup)
    assert "Already have an account?" in body
    assert f'<a href="{reverse("login")}">Log in</a>' in body
    for field, label in [
        ("username", "Username"),
        ("email", "Email"),
        ("password", "Password"),
        ("tenant_name", "Organisation or team name"),
    ]:
        assert f'<label for="id_{field}">{label}</label>' in body


def test_signup_creates_user_tenant_and_owner_and_signs_in(client: Client, world: World) -> None:
    response = client.post(reverse("tenants:signup"), SIGNUP)
    assert response.status_code == 302
    assert response["Location"] == reverse("graphs:list")
    user = User.objects.get(username="newbie")
    assert user.email == "newbie@example.com"
    assert user.check_password(SIGNUP["password"])
    tenant = Tenant.objects.get(slug="newbie-labs")
    assert tenant.name == "Newbie Labs"
    membership = Membership.unscoped_all_tenants.get(user=user)
    assert (membership.tenant_id, membership.role) == (tenant.pk, Role.OWNER)
    assert [
        e.action for e in AuditEntry.unscoped_all_tenants.filter(tenant=tenant).order_by("pk")
    ] == [
        "tenant.create",
        "membership.add",
        "user.signup",
    ]
    signup_entry = audit(tenant, "user.signup")[0]
    assert signup_entry.actor_id == user.pk
    assert signup_entry.after == {"username": "newbie", "email": "newbie@example.com"}
    assert SIGNUP["password"] not in str(list(AuditEntry.unscoped_all_tenants.values()))
    page = text(client.get(reverse("graphs:list")))
    assert '<a class="tenant" href="/tenants/" title="Switch tenant">Newbie Labs</a>' in page
    assert "Welcome! You are owner of Newbie Labs." in page
    assert client.session[SESSION_TENANT_KEY] == tenant.pk


@pytest.mark.parametrize(
    ("changes", "field", "message"),
    [
        ({"tenant_name": "ACME"}, "tenant_name", "A tenant named “acme” already exists"),
        ({"tenant_name": "!!!"}, "tenant_name", "Use at least one letter or digit"),
        ({"username": "Owner"}, "username", "That username is taken"),
        ({"username": "no spaces"}, "username", "Enter a valid username"),
        ({"password": "password"}, "password", "This password is too common."),
        ({"password": "short"}, "password", "This password is too short."),
        ({"email": "not-an-email"}, "email", "Enter a valid email address."),
        ({"tenant_name": ""}, "tenant_name", "This field is required."),
    ],
)
def test_bad_signups_show_the_error_on_the_field_and_write_nothing(
    client: Client, world: World, changes: dict[str, str], field: str, message: str
) -> None:
    before = state()
    response = client.post(reverse("tenants:signup"), {**SIGNUP, **changes})
    assert response.status_code == 400
    body = text(response)
    assert message in field_errors(body, field)
    assert state() == before
    assert "_auth_user_id" not in client.session


def test_signup_refuses_an_email_in_use(client: Client, world: World) -> None:
    world.owner.email = "boss@acme.test"  # type: ignore[attr-defined]
    world.owner.save()
    before = state()
    response = client.post(reverse("tenants:signup"), {**SIGNUP, "email": "BOSS@acme.test"})
    assert response.status_code == 400
    assert "An account with this email exists already" in field_errors(text(response), "email")
    assert state() == before


def test_signed_in_users_are_sent_from_signup_to_create_a_tenant(
    client: Client, world: World
) -> None:
    response = sign_in(client, world.viewer).get(reverse("tenants:signup"))
    assert response.status_code == 302
    assert response["Location"] == reverse("tenants:create")


# -- the user's tenants: list, create, switch ---------------------------------------------------


def test_create_another_tenant_makes_the_user_its_owner_and_switches_to_it(
    client: Client, world: World
) -> None:
    sign_in(client, world.viewer)
    response = client.post(reverse("tenants:create"), {"name": "Side Project"})
    assert response.status_code == 302
    tenant = Tenant.objects.get(slug="side-project")
    assert member(world, tenant, "viewer").role == Role.OWNER
    assert member(world, world.acme, "viewer").role == Role.VIEWER
    entries = AuditEntry.unscoped_all_tenants.filter(tenant=tenant).order_by("pk")
    assert [e.action for e in entries] == ["tenant.create", "membership.add"]
    assert entries[1].after == {"user": "viewer", "role": "owner", "via": "create"}
    assert audit(tenant, "tenant.create")[0].actor_id == world.viewer.pk
    body = text(client.get(reverse("graphs:list")))
    assert '<a class="tenant" href="/tenants/" title="Switch tenant">Side Project</a>' in body


def test_create_tenant_with_a_taken_name_is_refused(client: Client, world: World) -> None:
    before = state()
    response = sign_in(client, world.viewer).post(reverse("tenants:create"), {"name": "Globex"})
    assert response.status_code == 400
    assert "A tenant named “globex” already exists" in field_errors(text(response), "name")
    assert state() == before


def test_a_user_with_no_tenant_can_create_one(client: Client, world: World) -> None:
    loner = User.objects.create_user("loner", password="pw-loner")
    sign_in(client, loner)
    assert client.get(reverse("graphs:list")).status_code == 404
    list_page = text(client.get(reverse("tenants:list")))
    assert "No tenants yet" in list_page
    client.post(reverse("tenants:create"), {"name": "Loner Inc"})
    assert client.get(reverse("graphs:list")).status_code == 200


def test_anonymous_visitors_are_sent_to_login(client: Client, db: None) -> None:
    for name in ["tenants:list", "tenants:create", "tenants:members", "tenants:settings"]:
        response = client.get(reverse(name))
        assert response.status_code == 302
        assert response["Location"] == f"{reverse('login')}?next={reverse(name)}"


def test_tenant_list_shows_roles_and_switches(client: Client, world: World) -> None:
    Membership.unscoped_all_tenants.create(tenant=world.globex, user=world.viewer, role="editor")
    sign_in(client, world.viewer)
    body = text(client.get(reverse("tenants:list")))
    rows = dict(re.findall(r'<tr data-tenant="(\w+)">(.*?)</tr>', body, re.S))
    assert set(rows) == {"acme", "globex"}
    assert "<td>viewer</td>" in rows["acme"] and '<span class="tag">current</span>' in rows["acme"]
    assert "<td>editor</td>" in rows["globex"] and "Switch to Globex" in rows["globex"]

    response = client.post(reverse("tenants:switch"), {"tenant": world.globex.pk})
    assert response.status_code == 302 and response["Location"] == reverse("graphs:list")
    assert client.session[SESSION_TENANT_KEY] == world.globex.pk
    assert '<a class="tenant" href="/tenants/" title="Switch tenant">Globex</a>' in text(
        client.get(reverse("graphs:list"))
    )


@pytest.mark.parametrize("target", ["other", "missing", "junk"])
def test_switching_to_a_tenant_one_is_not_in_is_not_found(
    client: Client, world: World, target: str
) -> None:
    tenant = {"other": world.globex.pk, "missing": 999_999, "junk": "x"}[target]
    sign_in(client, world.owner)
    client.post(reverse("tenants:switch"), {"tenant": world.acme.pk})
    response = client.post(reverse("tenants:switch"), {"tenant": tenant})
    assert response.status_code == 404
    assert client.session[SESSION_TENANT_KEY] == world.acme.pk
    assert client.get(reverse("tenants:switch")).status_code == 405


def test_switch_goes_back_to_a_local_next_only(client: Client, world: World) -> None:
    Membership.unscoped_all_tenants.create(tenant=world.globex, user=world.viewer, role="viewer")
    sign_in(client, world.viewer)
    local = client.post(reverse("tenants:switch"), {"tenant": world.globex.pk, "next": "/tenants/"})
    assert local["Location"] == "/tenants/"
    away = client.post(
        reverse("tenants:switch"), {"tenant": world.globex.pk, "next": "https://evil.test/"}
    )
    assert away["Location"] == reverse("graphs:list")


# -- members ----------------------------------------------------------------------------------


@pytest.mark.parametrize("role", ["viewer", "operator", "editor", "owner"])
def test_every_member_sees_the_members_and_only_owners_see_controls(
    client: Client, world: World, role: str
) -> None:
    world.editor.email = "ed@acme.test"  # type: ignore[attr-defined]
    world.editor.save()
    response = sign_in(client, getattr(world, role)).get(reverse("tenants:members"))
    assert response.status_code == 200
    body = text(response)
    rows = dict(re.findall(r'<tr data-member="(\w+)">(.*?)</tr>', body, re.S))
    assert set(rows) == {"owner", "editor", "operator", "viewer"}  # not the outsider
    assert "ed@acme.test" in rows["editor"]
    for name in rows:
        assert f'<td class="member-role">{name}</td>' in rows[name]
    owner_controls = ['name="role"', "Create invite", "Remove", "Pending invites"]
    for control in owner_controls:
        assert (control in body) == (role == "owner"), control


def test_owner_changes_a_role(client: Client, world: World) -> None:
    target = member(world, world.acme, "viewer")
    response = sign_in(client, world.owner).post(
        reverse("tenants:change_role", args=[target.pk]), {"role": "editor"}, follow=True
    )
    assert response.redirect_chain == [(reverse("tenants:members"), 302)]
    assert "viewer is now editor." in text(response)
    assert (
        '<td class="member-role">editor</td>'
        in re.findall(r'<tr data-member="viewer">(.*?)</tr>', text(response), re.S)[0]
    )
    target.refresh_from_db()
    assert target.role == Role.EDITOR
    [entry] = audit(world.acme, "membership.change")
    assert entry.actor_id == world.owner.pk
    assert entry.target_id == str(target.pk)
    assert entry.before == {"user": "viewer", "role": "viewer"}
    assert entry.after == {"user": "viewer", "role": "editor"}


def test_setting_the_same_role_writes_nothing(client: Client, world: World) -> None:
    target = member(world, world.acme, "viewer")
    before = state()
    response = sign_in(client, world.owner).post(
        reverse("tenants:change_role", args=[target.pk]), {"role": "viewer"}, follow=True
    )
    assert "viewer was viewer already; nothing changed." in text(response)
    assert state() == before


def test_a_bad_role_is_refused(client: Client, world: World) -> None:
    target = member(world, world.acme, "viewer")
    before = state()
    response = sign_in(client, world.owner).post(
        reverse("tenants:change_role", args=[target.pk]), {"role": "god"}
    )
    assert response.status_code == 400
    assert "Select a valid choice." in text(response)
    assert f'id="role-{target.pk}-error"' in text(response)
    assert state() == before


def test_the_last_owner_cannot_be_demoted_or_removed(client: Client, world: World) -> None:
    owner = member(world, world.acme, "owner")
    sign_in(client, world.owner)
    before = state()
    demote = client.post(reverse("tenants:change_role", args=[owner.pk]), {"role": "editor"})
    assert demote.status_code == 400
    message = "Acme needs at least one owner: make another member owner first."
    assert message in text(demote)
    remove = client.post(reverse("tenants:remove_member", args=[owner.pk]))
    assert remove.status_code == 400
    assert message in text(remove)
    assert state() == before

    # With a second owner, the first may step down.
    client.post(
        reverse("tenants:change_role", args=[member(world, world.acme, "editor").pk]),
        {"role": "owner"},
    )
    response = client.post(reverse("tenants:change_role", args=[owner.pk]), {"role": "editor"})
    assert response.status_code == 302
    owner.refresh_from_db()
    assert owner.role == Role.EDITOR


def test_owner_removes_a_member(client: Client, world: World) -> None:
    target = member(world, world.acme, "operator")
    response = sign_in(client, world.owner).post(
        reverse("tenants:remove_member", args=[target.pk]), follow=True
    )
    assert "operator was removed from Acme." in text(response)
    assert not Membership.unscoped_all_tenants.filter(pk=target.pk).exists()
    [entry] = audit(world.acme, "membership.remove")
    assert entry.before == {"user": "operator", "role": "operator"}
    assert entry.after is None
    assert sign_in(Client(), world.operator).get(reverse("graphs:list")).status_code == 404


def test_an_owner_may_leave_when_another_owner_remains(client: Client, world: World) -> None:
    Membership.unscoped_all_tenants.filter(tenant=world.acme, user=world.editor).update(
        role="owner"
    )
    me = member(world, world.acme, "owner")
    response = sign_in(client, world.owner).post(reverse("tenants:remove_member", args=[me.pk]))
    assert response["Location"] == reverse("tenants:list")
    assert not Membership.unscoped_all_tenants.filter(pk=me.pk).exists()


# -- owner-only writes: 403 below owner, 404 across tenants ----------------------------------------


def _ids(world: World) -> dict[str, dict[str, int]]:
    """A member, a pending invite and a live key in each tenant."""
    ids: dict[str, dict[str, int]] = {}
    for tenant, owner, name in [
        (world.acme, world.owner, "viewer"),
        (world.globex, world.outsider, "outsider"),
    ]:
        invite, _ = invite_member(
            tenant=tenant,
            email=f"someone@{tenant.slug}.test",
            role="viewer",
            base_url="http://testserver",
            actor=owner,
        )
        key, _ = create_api_key(tenant=tenant, name="k", scopes=["runs:read"], actor=owner)
        ids[tenant.slug] = {
            "member": member(world, tenant, name).pk,
            "invite": invite.pk,
            "key": key.pk,
        }
    return ids


WRITES: dict[str, tuple[str, str | None, dict[str, Any]]] = {
    "change role": ("tenants:change_role", "member", {"role": "owner"}),
    "remove member": ("tenants:remove_member", "member", {}),
    "invite": ("tenants:invite", None, {"email": "new@x.test", "role": "owner"}),
    "revoke invite": ("tenants:revoke_invite", "invite", {}),
    "create key": ("tenants:create_key", None, {"name": "mine", "scopes": ["runs:read"]}),
    "revoke key": ("tenants:revoke_key", "key", {}),
    "settings": (
        "tenants:settings",
        None,
        {"monthly_budget_usd": "1", "max_active_runs": "1", "feed_retention_days": "7"},
    ),
}


@pytest.mark.parametrize("role", ["viewer", "operator", "editor"])
@pytest.mark.parametrize("write", WRITES.values(), ids=WRITES.keys())
def test_owner_only_writes_are_forbidden_below_owner_and_write_nothing(
    client: Client, world: World, role: str, write: tuple[str, str | None, dict[str, Any]]
) -> None:
    name, kind, data = write
    ids = _ids(world)
    args = [ids["acme"][kind]] if kind else []
    before = state()
    response = sign_in(client, getattr(world, role)).post(reverse(name, args=args), data)
    assert response.status_code == 403
    assert "This needs the owner role" in text(response)
    assert state() == before


@pytest.mark.parametrize(
    "write", [w for w in WRITES.values() if w[1]], ids=[k for k, w in WRITES.items() if w[1]]
)
@pytest.mark.parametrize("who", ["acme owner", "globex owner"])
def test_another_tenants_ids_are_not_found_and_untouched(
    client: Client, world: World, who: str, write: tuple[str, str | None, dict[str, Any]]
) -> None:
    name, kind, data = write
    assert kind is not None
    ids = _ids(world)
    actor, theirs = (world.owner, "globex") if who == "acme owner" else (world.outsider, "acme")
    before = state()
    response = sign_in(client, actor).post(reverse(name, args=[ids[theirs][kind]]), data)
    assert response.status_code == 404
    assert state() == before
    # The control: the same request for their own tenant's object is not a 404.
    own = "acme" if theirs == "globex" else "globex"
    assert client.post(reverse(name, args=[ids[own][kind]]), data).status_code in (302, 400)


@pytest.mark.parametrize("role", ["viewer", "operator"])
def test_keys_page_needs_the_editor_role(client: Client, world: World, role: str) -> None:
    response = sign_in(client, getattr(world, role)).get(reverse("tenants:keys"))
    assert response.status_code == 403
    assert "This needs the editor role" in text(response)


# -- quotas and budget ------------------------------------------------------------------------


@pytest.mark.parametrize("role", ["viewer", "operator", "editor"])
def test_members_read_the_settings_without_controls(
    client: Client, world: World, role: str
) -> None:
    Tenant.objects.filter(pk=world.acme.pk).update(monthly_budget_usd=Decimal("50"))
    body = text(sign_in(client, getattr(world, role)).get(reverse("tenants:settings")))
    assert re.search(r'<input[^>]*name="monthly_budget_usd"[^>]*value="50"[^>]*disabled', body)
    assert "Save</button>" not in body
    assert f"Only owners change these; you are {role}." in body


def test_owner_sets_quotas_with_one_audit_entry_of_the_changed_fields(
    client: Client, world: World
) -> None:
    sign_in(client, world.owner)
    response = client.post(
        reverse("tenants:settings"),
        {
            "monthly_budget_usd": "50.5",
            "max_run_budget_usd": "",
            "max_active_runs": "3",
            "feed_retention_days": "30",
        },
        follow=True,
    )
    assert response.redirect_chain == [(reverse("tenants:settings"), 302)]
    assert "Saved: monthly budget (USD), active runs at once." in text(response)
    world.acme.refresh_from_db()
    assert world.acme.monthly_budget_usd == Decimal("50.5")
    assert world.acme.max_active_runs == 3
    assert world.acme.max_run_budget_usd is None
    [entry] = audit(world.acme, "tenant.settings")
    assert entry.before == {"monthly_budget_usd": None, "max_active_runs": None}
    assert entry.after == {"monthly_budget_usd": "50.5", "max_active_runs": 3}

    client.post(
        reverse("tenants:settings"),
        {
            "monthly_budget_usd": "50.50",
            "max_run_budget_usd": "2",
            "max_active_runs": "",
            "feed_retention_days": "30",
        },
    )
    second = audit(world.acme, "tenant.settings")[1]
    assert second.before == {"max_run_budget_usd": None, "max_active_runs": 3}
    assert second.after == {"max_run_budget_usd": "2", "max_active_runs": None}

    before = state()
    same = client.post(
        reverse("tenants:settings"),
        {
            "monthly_budget_usd": "50.5",
            "max_run_budget_usd": "2.0",
            "max_active_runs": "",
            "feed_retention_days": "30",
        },
        follow=True,
    )
    assert "Nothing changed." in text(same)
    assert state() == before


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("monthly_budget_usd", "-1", "Ensure this value is greater than or equal to 0."),
        ("monthly_budget_usd", "1000000", "Ensure this value is less than or equal to 100000."),
        ("max_run_budget_usd", "ten", "Enter a number."),
        ("max_run_budget_usd", "0.0000001", "Ensure that there are no more than 6 decimal places."),
        ("max_active_runs", "0", "Ensure this value is greater than or equal to 1."),
        ("max_active_runs", "2.5", "Enter a whole number."),
        ("max_active_runs", "100000", "Ensure this value is less than or equal to 10000."),
        ("feed_retention_days", "0", "Ensure this value is greater than or equal to 1."),
        ("feed_retention_days", "-1", "Ensure this value is greater than or equal to 1."),
        ("feed_retention_days", "abc", "Enter a whole number."),
        ("feed_retention_days", "3651", "Ensure this value is less than or equal to 3650."),
        ("feed_retention_days", "9" * 30, "Ensure this value is less than or equal to 3650."),
    ],
)
def test_bad_quota_values_are_refused_on_the_field(
    client: Client, world: World, field: str, value: str, message: str
) -> None:
    before = state()
    data = {
        "monthly_budget_usd": "5",
        "max_run_budget_usd": "",
        "max_active_runs": "",
        "feed_retention_days": "30",
        field: value,
    }
    response = sign_in(client, world.owner).post(reverse("tenants:settings"), data)
    assert response.status_code == 400
    assert message in field_errors(text(response), field)
    assert f'value="{value}"' in text(response)  # kept for correction
    assert state() == before


def test_owner_sets_the_feed_retention_and_cannot_empty_it(client: Client, world: World) -> None:
    sign_in(client, world.owner)
    data = {"monthly_budget_usd": "", "max_run_budget_usd": "", "max_active_runs": ""}
    response = client.post(
        reverse("tenants:settings"), {**data, "feed_retention_days": "7"}, follow=True
    )
    assert "Saved: live feed retention (days)." in text(response)
    world.acme.refresh_from_db()
    assert world.acme.feed_retention_days == 7
    [entry] = audit(world.acme, "tenant.settings")
    assert (entry.before, entry.after) == ({"feed_retention_days": 30}, {"feed_retention_days": 7})
    assert re.search(r'<input[^>]*name="feed_retention_days"[^>]*value="7"', text(response))

    before = state()
    emptied = client.post(reverse("tenants:settings"), {**data, "feed_retention_days": ""})
    assert emptied.status_code == 400
    assert "Enter how many days to keep a finished run" in field_errors(
        text(emptied), "feed_retention_days"
    )
    assert state() == before


def test_the_settings_service_refuses_a_retention_out_of_bounds(world: World) -> None:
    """Callers other than the form get the same bounds, and nothing is written."""
    for value in (0, 3651, "30", True, None):
        with pytest.raises(Refused) as refused:
            update_settings(
                tenant=world.acme, values={"feed_retention_days": value}, actor=world.owner
            )
        assert list(refused.value.errors) == ["feed_retention_days"]
    world.acme.refresh_from_db()
    assert world.acme.feed_retention_days == 30


def _start(world: World, slug: str, spec: dict[str, Any]) -> Run:
    graph = world.graph(slug, spec)
    with tenant_context(world.acme):
        return start_run(version=graph.live_version(), payload={"x": 1}, actor=world.owner)


def test_max_active_runs_refuses_a_run_beyond_the_limit_until_one_ends(world: World) -> None:
    Tenant.objects.filter(pk=world.acme.pk).update(max_active_runs=2)
    first = _start(world, "a", SPEC)
    _start(world, "b", SPEC)
    with pytest.raises(InvalidInput) as refused:
        _start(world, "c", SPEC)
    assert str(refused.value) == (
        "Acme has 2 runs active; its limit is 2. Wait for one to finish or raise the limit in"
        " Settings."
    )
    assert Run.unscoped_all_tenants.filter(tenant=world.acme).count() == 2
    # Another tenant's runs do not count, and a finished run frees its place.
    theirs = world.graph("g", SPEC, tenant=world.globex)
    with tenant_context(world.globex):
        start_run(version=theirs.live_version(), payload={"x": 1}, actor=world.outsider)
    with tenant_context(world.acme):
        cancel_run(first, actor=world.owner)
    _start(world, "d", SPEC)
    assert Run.unscoped_all_tenants.filter(tenant=world.acme).count() == 3


def test_max_run_budget_refuses_larger_or_missing_run_budgets(world: World) -> None:
    Tenant.objects.filter(pk=world.acme.pk).update(max_run_budget_usd=Decimal("2"))
    with pytest.raises(InvalidInput) as too_big:
        _start(world, "big", {**SPEC, "policies": {"budget_usd": 5}})
    assert str(too_big.value) == (
        "This graph's policies.budget_usd is $5; Acme allows at most $2 per run. Lower it in"
        " the graph or raise the limit in Settings."
    )
    with pytest.raises(InvalidInput) as missing:
        _start(world, "none", SPEC)
    assert "this graph sets no policies.budget_usd" in str(missing.value)
    run = _start(world, "ok", {**SPEC, "policies": {"budget_usd": 1.5}})
    assert run.budget_usd == Decimal("1.5")
    assert Run.unscoped_all_tenants.count() == 1


def test_a_quota_refusal_shows_on_the_run_form(client: Client, world: World) -> None:
    Tenant.objects.filter(pk=world.acme.pk).update(max_active_runs=1)
    _start(world, "alpha", SPEC)
    response = sign_in(client, world.operator).post(
        reverse("graphs:start_run", args=["alpha"]), {"payload": '{"x": 2}'}
    )
    assert response.status_code == 400
    assert "Acme has 1 run active; its limit is 1." in field_errors(text(response), "payload")


# -- htmx and an expired session --------------------------------------------------------------


def test_an_htmx_request_without_a_session_gets_hx_redirect(client: Client, world: World) -> None:
    world.graph("alpha", SPEC)
    url = reverse("graphs:detail", args=["alpha"])
    response = client.get(url, headers={"HX-Request": "true"})
    assert response.status_code == 200
    assert response["HX-Redirect"] == f"{reverse('login')}?next={url}"
    assert response.content == b""
    plain = client.get(url)
    assert plain.status_code == 302
    assert plain["Location"] == f"{reverse('login')}?next={url}"
    assert "HX-Redirect" not in plain
