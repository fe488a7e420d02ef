"""Invites by link: an owner invites an email in a role, the link arrives by mail (and is
shown once), and whoever opens it joins, signed in or by signing up. Expired, revoked,
used and unknown links are refused with a page that says so, and write nothing."""

import hashlib
import re
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.core import mail
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from apps.audit.models import AuditEntry
from apps.tenants.middleware import SESSION_TENANT_KEY
from apps.tenants.models import Invitation, Membership, Role, Tenant
from tests.conftest import World
from tests.tenants.test_self_service import audit, field_errors, state
from tests.web.test_pages import sign_in, text

pytestmark = pytest.mark.django_db

User = get_user_model()
Capture = Callable[..., Any]
LINK = re.compile(r"http://testserver/invites/([A-Za-z0-9_-]+)/")


def invite(
    client: Client, capture: Capture, email: str = "new@example.com", role: str = "viewer"
) -> tuple[Any, str]:
    """Posts the invite form as the signed-in owner, running on-commit work (the mail)."""
    with capture(execute=True):
        response = client.post(reverse("tenants:invite"), {"email": email, "role": role})
    assert response.status_code == 200, text(response)
    shown = re.search(
        r'<input type="text" id="invite-link" class="code" value="([^"]+)"', text(response)
    )
    assert shown is not None
    return response, shown[1]


def newcomer(name: str = "newcomer") -> Any:
    return User.objects.create_user(name, f"{name}@example.com", "pw-" + name)


def test_invite_link_from_the_mail_makes_a_member_in_the_role(
    client: Client, world: World, django_capture_on_commit_callbacks: Capture
) -> None:
    response, link = invite(sign_in(client, world.owner), django_capture_on_commit_callbacks)
    assert "It will not be shown again." in text(response)
    assert "no-store" in response["Cache-Control"]
    [sent] = mail.outbox
    assert sent.to == ["new@example.com"]
    assert sent.subject == "Join Acme on Sluice"
    mailed = LINK.search(str(sent.body))
    assert mailed is not None and mailed[0] == link
    assert "owner invites you to join Acme on Sluice as viewer" in sent.body
    token = mailed[1]

    invitation = Invitation.unscoped_all_tenants.get()
    assert invitation.token_hash == hashlib.sha256(token.encode()).hexdigest()
    assert token not in str(Invitation.unscoped_all_tenants.values().get())
    [created] = audit(world.acme, "invite.create")
    assert created.after is not None
    assert (created.after["email"], created.after["role"]) == ("new@example.com", "viewer")
    assert token not in str(list(AuditEntry.unscoped_all_tenants.values()))
    lifetime = invitation.expires_at - invitation.created_at
    assert abs(lifetime - timedelta(days=7)) < timedelta(seconds=5)
    # Shown once: the members page later lists the invite, not its link.
    later = text(client.get(reverse("tenants:members")))
    assert "new@example.com" in later and token not in later

    guest = sign_in(Client(), newcomer())
    page = guest.get(f"/invites/{token}/")
    assert page.status_code == 200
    assert "Accept and join as viewer" in text(page)
    accepted = guest.post(f"/invites/{token}/", follow=True)
    assert accepted.redirect_chain == [(reverse("graphs:list"), 302)]
    body = text(accepted)
    assert "You joined Acme as viewer." in body
    assert '<a class="tenant" href="/tenants/" title="Switch tenant">Acme</a>' in body
    membership = Membership.unscoped_all_tenants.get(user__username="newcomer")
    assert (membership.tenant_id, membership.role) == (world.acme.pk, Role.VIEWER)
    assert guest.session[SESSION_TENANT_KEY] == world.acme.pk
    invitation.refresh_from_db()
    assert invitation.accepted_at is not None
    assert invitation.accepted_by_id == membership.user_id
    [entry] = audit(world.acme, "invite.accept")
    assert entry.actor_id == membership.user_id
    assert entry.before == {"email": "new@example.com", "role": "viewer", "state": "pending"}
    assert entry.after == {"email": "new@example.com", "role": "viewer", "state": "accepted"}
    assert audit(world.acme, "membership.add")[-1].after == {
        "user": "newcomer",
        "role": "viewer",
        "via": "invite",
    }

    # Used: the same link refuses the next person and writes nothing.
    other = sign_in(Client(), newcomer("latecomer"))
    before = state()
    again = other.post(f"/invites/{token}/")
    assert again.status_code == 410
    assert "This invite has been used" in text(again)
    assert state() == before
    assert "You accepted this invite" in text(guest.get(f"/invites/{token}/"))


def test_an_anonymous_visitor_is_offered_log_in_or_sign_up(
    client: Client, world: World, django_capture_on_commit_callbacks: Capture
) -> None:
    _, link = invite(sign_in(Client(), world.owner), django_capture_on_commit_callbacks)
    token = LINK.search(link)[1]  # type: ignore[index]
    body = text(client.get(link))
    assert "owner invited new@example.com to join <strong>Acme</strong>" in body
    assert f'href="{reverse("tenants:signup")}?invite={token}"' in body
    assert f'href="{reverse("login")}?next=/invites/{token}/"' in body
    before = state()
    posted = client.post(f"/invites/{token}/")
    assert posted.status_code == 302
    assert posted["Location"] == f"{reverse('login')}?next=/invites/{token}/"
    assert state() == before

    # Logging in through the offered link comes back to the invite.
    newcomer()
    login = client.post(
        f"{reverse('login')}?next=/invites/{token}/",
        {"username": "newcomer", "password": "pw-newcomer", "next": f"/invites/{token}/"},
    )
    assert login["Location"] == f"/invites/{token}/"
    client.post(f"/invites/{token}/")
    assert Membership.unscoped_all_tenants.filter(
        tenant=world.acme, user__username="newcomer", role="viewer"
    ).exists()


def test_signup_through_an_invite_joins_that_tenant(
    client: Client, world: World, django_capture_on_commit_callbacks: Capture
) -> None:
    _, link = invite(
        sign_in(Client(), world.owner), django_capture_on_commit_callbacks, role="operator"
    )
    token = LINK.search(link)[1]  # type: ignore[index]
    page = client.get(f"{reverse('tenants:signup')}?invite={token}")
    body = text(page)
    assert "Join Acme" in body and "as <strong>operator</strong>" in body
    assert 'name="tenant_name"' not in body
    assert re.search(r'<input type="email" name="email" value="new@example.com"', body)
    assert f'<input type="hidden" name="invite" value="{token}">' in body
    assert f'href="{reverse("login")}?next=/invites/{token}/"' in body

    tenants = Tenant.objects.count()
    response = client.post(
        reverse("tenants:signup"),
        {
            "username": "joiner",
            "email": "new@example.com",
            "password": "a long enough passphrase",
            "invite": token,
        },
    )
    assert response.status_code == 302 and response["Location"] == reverse("graphs:list")
    assert Tenant.objects.count() == tenants
    membership = Membership.unscoped_all_tenants.get(user__username="joiner")
    assert (membership.tenant_id, membership.role) == (world.acme.pk, Role.OPERATOR)
    assert [e.after for e in audit(world.acme, "user.signup")] == [
        {"username": "joiner", "email": "new@example.com"}
    ]
    assert Invitation.unscoped_all_tenants.get().accepted_by_id == membership.user_id
    assert '<a class="tenant" href="/tenants/" title="Switch tenant">Acme</a>' in text(
        client.get(reverse("graphs:list"))
    )


def test_a_bad_signup_through_an_invite_leaves_it_pending(
    client: Client, world: World, django_capture_on_commit_callbacks: Capture
) -> None:
    _, link = invite(sign_in(Client(), world.owner), django_capture_on_commit_callbacks)
    token = LINK.search(link)[1]  # type: ignore[index]
    before = state()
    response = client.post(
        reverse("tenants:signup"),
        {"username": "joiner", "email": "x@example.com", "password": "password", "invite": token},
    )
    assert response.status_code == 400
    assert "too common" in field_errors(text(response), "password")
    assert state() == before


@pytest.mark.parametrize("how", ["expired", "revoked"])
def test_expired_and_revoked_links_are_gone(
    client: Client, world: World, django_capture_on_commit_callbacks: Capture, how: str
) -> None:
    owner = sign_in(Client(), world.owner)
    _, link = invite(owner, django_capture_on_commit_callbacks)
    token = LINK.search(link)[1]  # type: ignore[index]
    invitation = Invitation.unscoped_all_tenants.get()
    if how == "expired":
        Invitation.unscoped_all_tenants.update(expires_at=timezone.now() - timedelta(seconds=1))
        title, advice = "This invite has expired", "ask an owner of Acme for a new one"
    else:
        revoked = owner.post(reverse("tenants:revoke_invite", args=[invitation.pk]), follow=True)
        assert "The invite to new@example.com was revoked." in text(revoked)
        [entry] = audit(world.acme, "invite.revoke")
        assert entry.before == {"email": "new@example.com", "role": "viewer", "state": "pending"}
        assert entry.after == {"email": "new@example.com", "role": "viewer", "state": "revoked"}
        title, advice = "This invite was withdrawn", "ask them for a new one"
    assert "new@example.com" not in text(owner.get(reverse("tenants:members")))

    sign_in(client, newcomer())
    before = state()
    for response in [
        client.get(f"/invites/{token}/"),
        client.post(f"/invites/{token}/"),
        Client().get(f"{reverse('tenants:signup')}?invite={token}"),
        Client().post(
            reverse("tenants:signup"),
            {
                "username": "z",
                "email": "z@example.com",
                "password": "long passphrase",
                "invite": token,
            },
        ),
    ]:
        assert response.status_code == 410
        assert title in text(response) and advice in text(response)
    assert state() == before


def test_revoking_twice_says_so(
    client: Client, world: World, django_capture_on_commit_callbacks: Capture
) -> None:
    invite(sign_in(client, world.owner), django_capture_on_commit_callbacks)
    invitation = Invitation.unscoped_all_tenants.get()
    client.post(reverse("tenants:revoke_invite", args=[invitation.pk]))
    before = state()
    again = client.post(reverse("tenants:revoke_invite", args=[invitation.pk]), follow=True)
    assert "Not revoked: the invite to new@example.com was revoked." in text(again)
    assert state() == before


def test_an_unknown_link_is_not_found(client: Client, world: World) -> None:
    for response in [
        client.get("/invites/not-a-real-token/"),
        sign_in(Client(), world.viewer).post("/invites/not-a-real-token/"),
        client.get(f"{reverse('tenants:signup')}?invite=nope"),
    ]:
        assert response.status_code == 404
        assert "This invite link is not valid" in text(response)
        assert "Check that you copied all of it" in text(response)


def test_accepting_when_already_a_member_changes_nothing(
    client: Client, world: World, django_capture_on_commit_callbacks: Capture
) -> None:
    _, link = invite(
        sign_in(Client(), world.owner), django_capture_on_commit_callbacks, role="editor"
    )
    sign_in(client, world.viewer)
    before = state()
    for response in [client.get(link), client.post(link)]:
        assert response.status_code == 200
        assert "You are a member of Acme already, as viewer. Nothing to do." in text(response)
    assert state() == before
    assert Invitation.unscoped_all_tenants.get().accepted_at is None


@pytest.mark.parametrize(
    ("email", "role", "field", "message"),
    [
        ("not-an-email", "viewer", "email", "Enter a valid email address."),
        ("new@example.com", "king", "role", "Select a valid choice."),
        ("ed@acme.test", "viewer", "email", "ed@acme.test is already a member of Acme."),
        ("first@example.com", "editor", "email", "An invite to first@example.com is pending"),
    ],
)
def test_bad_invites_are_refused_on_the_field(
    client: Client,
    world: World,
    django_capture_on_commit_callbacks: Capture,
    email: str,
    role: str,
    field: str,
    message: str,
) -> None:
    world.editor.email = "ed@acme.test"  # type: ignore[attr-defined]
    world.editor.save()
    invite(sign_in(client, world.owner), django_capture_on_commit_callbacks, "first@example.com")
    mail.outbox.clear()
    before = state()
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(reverse("tenants:invite"), {"email": email, "role": role})
    assert response.status_code == 400
    assert message in field_errors(text(response), field)
    assert state() == before
    assert mail.outbox == []
    assert 'id="invite-link"' not in text(response)


def test_owners_see_pending_invites_only(
    client: Client, world: World, django_capture_on_commit_callbacks: Capture
) -> None:
    sign_in(client, world.owner)
    for email in ["a@example.com", "b@example.com", "c@example.com"]:
        invite(client, django_capture_on_commit_callbacks, email)
    Invitation.unscoped_all_tenants.filter(email="b@example.com").update(
        expires_at=timezone.now() - timedelta(days=1)
    )
    Invitation.unscoped_all_tenants.filter(email="c@example.com").update(revoked_at=timezone.now())
    body = text(client.get(reverse("tenants:members")))
    assert re.findall(r'<tr data-invite="([^"]+)">', body) == ["a@example.com"]
    assert "a@example.com" not in text(
        sign_in(Client(), world.editor).get(reverse("tenants:members"))
    )
