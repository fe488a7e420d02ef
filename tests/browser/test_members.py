"""Members in Chromium: an owner invites an email as viewer, a second browser opens the link
from the page, signs up through it and lands in Acme as viewer; the owner makes them editor.
Removing a member asks first. The web server only: no worker is needed."""

from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, Dialog, Page, expect

from apps.tenants.models import Membership
from tests.browser.conftest import SCREENSHOT_DIR
from tests.browser.helpers import BrowserLog, login
from tests.conftest import World
from tests.harness.platform import Platform

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


@pytest.fixture(scope="module")
def platform(django_db_setup: None) -> Iterator[Platform]:
    """The web server only (started by `live_url`)."""
    running = Platform("members")
    try:
        yield running
    finally:
        running.stop()


def shot(page: Page, name: str) -> None:
    SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=SCREENSHOT_DIR / f"{name}.png", full_page=True)


def test_member_invite_accept_and_role_change(
    world: World, live_url: str, page: Page, chromium: Browser, browser_log: BrowserLog
) -> None:
    login(page, live_url, "owner")
    page.goto(f"{live_url}/tenant/members/")
    expect(page.get_by_role("heading", name="Members of Acme")).to_be_visible()
    page.get_by_label("Email", exact=True).fill("newbie@example.com")
    page.get_by_label("Role", exact=True).select_option("viewer")
    page.get_by_role("button", name="Create invite").click()

    expect(
        page.get_by_role("heading", name="Invite created for newbie@example.com")
    ).to_be_visible()
    link = page.locator("#invite-link").input_value()
    assert link.startswith(f"{live_url}/invites/"), link
    expect(page.locator('tr[data-invite="newbie@example.com"]')).to_contain_text("viewer")
    shot(page, "member_invite_link")

    guest_context = chromium.new_context(viewport={"width": 1280, "height": 900})
    try:
        guest = guest_context.new_page()
        guest.goto(link)
        expect(guest.get_by_role("heading", name="Join Acme")).to_be_visible()
        shot(guest, "member_invite_landing")
        guest.get_by_role("link", name="Sign up and join").click()
        expect(guest.get_by_label("Email")).to_have_value("newbie@example.com")
        guest.get_by_label("Username").fill("newbie")
        guest.get_by_label("Password").fill("a long enough passphrase")
        guest.get_by_role("button", name="Create account and join").click()

        expect(guest).to_have_url(f"{live_url}/")
        expect(guest.locator(".site-header .tenant")).to_have_text("Acme")
        expect(guest.locator(".user-name")).to_contain_text("newbie")
        expect(guest.locator(".user-name .role")).to_have_text("viewer")
        expect(guest.locator(".message-success")).to_contain_text("You are viewer of Acme.")
        shot(guest, "member_joined_as_viewer")
    finally:
        guest_context.close()

    page.goto(f"{live_url}/tenant/members/")
    row = page.locator('tr[data-member="newbie"]')
    expect(row.locator(".member-role")).to_have_text("viewer")
    expect(page.locator('tr[data-invite="newbie@example.com"]')).to_have_count(0)
    row.get_by_label("Role of newbie").select_option("editor")
    row.get_by_role("button", name="Save").click()
    expect(page.locator(".message-success")).to_have_text("newbie is now editor.")
    expect(page.locator('tr[data-member="newbie"] .member-role')).to_have_text("editor")
    membership = Membership.unscoped_all_tenants.get(user__username="newbie")
    assert (membership.tenant_id, membership.role) == (world.acme.pk, "editor")
    shot(page, "member_role_changed")
    assert browser_log.script_errors() == []


def test_member_removal_asks_first(
    world: World, live_url: str, page: Page, browser_log: BrowserLog
) -> None:
    login(page, live_url, "owner")
    page.goto(f"{live_url}/tenant/members/")
    remove = page.locator('tr[data-member="operator"]').get_by_role("button", name="Remove")
    questions: list[str] = []

    def answer(accept: bool) -> None:
        def on_dialog(dialog: Dialog) -> None:
            questions.append(dialog.message)
            dialog.accept() if accept else dialog.dismiss()

        page.once("dialog", on_dialog)

    answer(False)
    remove.click()
    expect(page.locator('tr[data-member="operator"]')).to_have_count(1)
    assert questions == ["Remove operator from Acme? They lose access at once."]
    assert Membership.unscoped_all_tenants.filter(user=world.operator).exists()

    answer(True)
    remove.click()
    expect(page.locator(".message-success")).to_have_text("operator was removed from Acme.")
    expect(page.locator('tr[data-member="operator"]')).to_have_count(0)
    assert not Membership.unscoped_all_tenants.filter(user=world.operator).exists()
    assert browser_log.script_errors() == []


def test_a_viewer_sees_members_without_controls(
    world: World, live_url: str, page: Page, browser_log: BrowserLog
) -> None:
    login(page, live_url, "viewer")
    page.goto(f"{live_url}/tenant/members/")
    expect(page.locator("#members tbody tr")).to_have_count(4)
    expect(page.get_by_role("button", name="Save")).to_have_count(0)
    expect(page.get_by_role("button", name="Create invite")).to_have_count(0)
    expect(page.get_by_role("link", name="API keys")).to_have_count(0)
    assert browser_log.script_errors() == []
