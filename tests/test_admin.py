"""Django admin lists every model; operational records (audit, usage, runs...) are read-only."""

import pytest
from django.apps import apps
from django.contrib import admin
from django.contrib.auth import get_user_model
from django.test import Client

from apps.audit.models import AuditEntry
from apps.runs.models import Usage
from tests.conftest import World

pytestmark = pytest.mark.django_db

OUR_APPS = ["tenants", "audit", "graphs", "runs", "live"]


def test_every_model_is_registered() -> None:
    models = [m for label in OUR_APPS for m in apps.get_app_config(label).get_models()]
    missing = [m.__name__ for m in models if not admin.site.is_registered(m)]
    assert missing == []


def test_changelists_render_across_tenants_and_audit_and_usage_are_read_only(world: World) -> None:
    staff = get_user_model().objects.create_superuser("root", password="pw-root")
    client = Client()
    client.force_login(staff)
    for label in OUR_APPS:
        for model in apps.get_app_config(label).get_models():
            url = f"/admin/{label}/{model._meta.model_name}/"
            assert client.get(url).status_code == 200, url
    page = client.get("/admin/audit/auditentry/").content.decode()
    assert "tenant.create" in page  # rows of both tenants are listed
    for model in (AuditEntry, Usage):
        model_admin = admin.site._registry[model]
        request = client.get("/admin/").wsgi_request
        assert not model_admin.has_add_permission(request)
        assert not model_admin.has_change_permission(request)
        assert not model_admin.has_delete_permission(request)
    entry = AuditEntry.unscoped_all_tenants.first()
    assert entry is not None
    assert (
        client.post(f"/admin/audit/auditentry/{entry.pk}/delete/", {"post": "yes"}).status_code
        == 403
    )
    assert AuditEntry.unscoped_all_tenants.filter(pk=entry.pk).exists()


def tenant_form(world: World, **changes: object) -> dict[str, object]:
    return {
        "slug": world.acme.slug,
        "name": world.acme.name,
        "outbound_allowlist": "",
        "monthly_budget_usd": "",
        "model_overrides": "{}",
        "feed_retention_days": "30",
        **changes,
    }


def test_tenant_budget_and_model_overrides_are_validated_and_audited(world: World) -> None:
    staff = get_user_model().objects.create_superuser("root", password="pw-root")
    client = Client()
    client.force_login(staff)
    url = f"/admin/tenants/tenant/{world.acme.pk}/change/"

    # A tenant may not redirect a model's requests: engine and params are the platform's.
    refused = tenant_form(world, model_overrides='{"default": {"params": {"base_url": "x"}}}')
    page = client.post(url, refused).content.decode()
    assert "a tenant may override only" in page and "not params" in page
    world.acme.refresh_from_db()
    assert world.acme.model_overrides == {}

    allowed = tenant_form(
        world, monthly_budget_usd="25.50", model_overrides='{"default": {"usd_per_mtok_out": 1}}'
    )
    assert client.post(url, allowed).status_code == 302
    world.acme.refresh_from_db()
    assert str(world.acme.monthly_budget_usd) == "25.500000"
    entry = AuditEntry.unscoped_all_tenants.get(tenant=world.acme, action="tenant.change")
    assert entry.after["monthly_budget_usd"] == "25.50"
    assert entry.before["monthly_budget_usd"] == "None"


def test_tenant_quotas_in_the_admin_keep_the_settings_pages_bounds_and_are_audited(
    world: World,
) -> None:
    staff = get_user_model().objects.create_superuser("root", password="pw-root")
    client = Client()
    client.force_login(staff)
    url = f"/admin/tenants/tenant/{world.acme.pk}/change/"
    refused = client.post(url, tenant_form(world, max_active_runs="0", monthly_budget_usd="-5"))
    assert refused.status_code == 200
    assert "Enter a number from 1 to" in refused.content.decode()
    world.acme.refresh_from_db()
    assert world.acme.max_active_runs is None and world.acme.monthly_budget_usd is None
    assert client.post(url, tenant_form(world, max_active_runs="3")).status_code == 302
    entry = AuditEntry.unscoped_all_tenants.get(tenant=world.acme, action="tenant.change")
    assert entry.after["max_active_runs"] == "3" and entry.before["max_active_runs"] == "None"


@pytest.mark.parametrize("value", ["0", "-1", "abc", "3651", "9" * 30, ""])
def test_a_bad_feed_retention_in_the_admin_is_a_form_error(world: World, value: str) -> None:
    staff = get_user_model().objects.create_superuser("root", password="pw-root")
    client = Client()
    client.force_login(staff)
    url = f"/admin/tenants/tenant/{world.acme.pk}/change/"
    refused = client.post(url, tenant_form(world, feed_retention_days=value))
    assert refused.status_code == 200
    assert refused.context["adminform"].form.errors["feed_retention_days"]
    world.acme.refresh_from_db()
    assert world.acme.feed_retention_days == 30
    assert client.post(url, tenant_form(world, feed_retention_days="7")).status_code == 302
    entry = AuditEntry.unscoped_all_tenants.get(tenant=world.acme, action="tenant.change")
    assert entry.before["feed_retention_days"] == "30"
    assert entry.after["feed_retention_days"] == "7"
