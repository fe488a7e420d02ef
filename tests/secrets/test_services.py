"""Secrets at rest and through the services: encrypted rows, the key, validation, tenant
scope, and audit entries that name the secret but never hold its value."""

import json

import pytest
from cryptography.fernet import Fernet
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings

from apps.audit.models import AuditEntry
from apps.secrets.crypto import check_key
from apps.secrets.models import Secret
from apps.secrets.services import (
    SecretInvalid,
    SecretMissing,
    SecretUnreadable,
    create_secret,
    delete_secret,
    replace_secret_value,
    secret_value,
)
from apps.tenants.context import NoTenantSelected, tenant_context
from tests.conftest import World
from tests.secrets.helpers import add_secret, stored

pytestmark = pytest.mark.django_db

VALUE = "sk-live-0123456789abcdef"
KEY_A = Fernet.generate_key().decode()
KEY_B = Fernet.generate_key().decode()


def test_the_row_holds_ciphertext_and_the_value_reads_back(world: World) -> None:
    add_secret(world, "provider-key", VALUE)
    row = stored(world.acme, "provider-key")
    assert row is not None and row.created_by == world.owner
    assert VALUE not in row.ciphertext and row.ciphertext.startswith("gAAAA")  # a Fernet token
    with tenant_context(world.acme):
        assert secret_value("provider-key") == VALUE


@override_settings(SLUICE_SECRETS_KEY=KEY_A)
def test_a_configured_key_is_the_fernet_key(world: World) -> None:
    add_secret(world, "k", VALUE)
    row = stored(world.acme, "k")
    assert row is not None
    assert Fernet(KEY_A.encode()).decrypt(row.ciphertext.encode()).decode() == VALUE


def test_a_different_key_fails_clearly_naming_the_secret_not_the_value(world: World) -> None:
    with override_settings(SLUICE_SECRETS_KEY=KEY_A):
        add_secret(world, "k", VALUE)
    with (
        override_settings(SLUICE_SECRETS_KEY=KEY_B),
        tenant_context(world.acme),
        pytest.raises(SecretUnreadable) as caught,
    ):
        secret_value("k")
    message = str(caught.value)
    assert "'k'" in message and "SLUICE_SECRETS_KEY" in message and VALUE not in message


def test_the_derived_key_follows_secret_key(world: World) -> None:
    with override_settings(SECRET_KEY="first-secret-key-" * 3):
        add_secret(world, "k", VALUE)
        with tenant_context(world.acme):
            assert secret_value("k") == VALUE
    with (
        override_settings(SECRET_KEY="second-secret-key-" * 3),
        tenant_context(world.acme),
        pytest.raises(SecretUnreadable),
    ):
        secret_value("k")


@pytest.mark.parametrize("bad", ["not-a-key", "c2hvcnQ=", "é" * 44])
def test_a_malformed_configured_key_is_improperly_configured(bad: str) -> None:
    with override_settings(SLUICE_SECRETS_KEY=bad), pytest.raises(ImproperlyConfigured) as caught:
        check_key()
    assert "SLUICE_SECRETS_KEY" in str(caught.value) and bad not in str(caught.value)


@pytest.mark.parametrize(
    ("name", "value", "field"),
    [
        ("", VALUE, "name"),
        ("Upper", VALUE, "name"),
        ("1st", VALUE, "name"),
        ("has space", VALUE, "name"),
        ("x" * 65, VALUE, "name"),
        ("ok", "   ", "value"),
        ("ok", "two\nlines", "value"),
        ("ok", "x" * 8193, "value"),
    ],
)
def test_bad_input_is_refused_naming_the_field(
    world: World, name: str, value: str, field: str
) -> None:
    with tenant_context(world.acme), pytest.raises(SecretInvalid) as caught:
        create_secret(name=name, value=value, actor=world.owner)
    assert caught.value.field == field
    assert not Secret.unscoped_all_tenants.exists()
    assert not AuditEntry.unscoped_all_tenants.filter(action__startswith="secret.").exists()


def test_a_pasted_trailing_newline_is_not_part_of_the_value(world: World) -> None:
    add_secret(world, "k", f"  {VALUE}\n")
    with tenant_context(world.acme):
        assert secret_value("k") == VALUE


def test_a_name_is_unique_per_tenant_not_across_tenants(world: World) -> None:
    add_secret(world, "shared", "acme-value")
    add_secret(world, "shared", "globex-value", tenant=world.globex)
    with tenant_context(world.acme), pytest.raises(SecretInvalid) as caught:
        create_secret(name="shared", value="again", actor=world.owner)
    assert caught.value.field == "name" and "already exists" in str(caught.value)
    with tenant_context(world.acme):
        assert secret_value("shared") == "acme-value"
    with tenant_context(world.globex):
        assert secret_value("shared") == "globex-value"


def test_secret_value_reads_only_the_current_tenants_secrets(world: World) -> None:
    add_secret(world, "acme-only", VALUE)
    with tenant_context(world.globex), pytest.raises(SecretMissing) as caught:
        secret_value("acme-only")
    assert "'acme-only'" in str(caught.value) and "Secrets page" in str(caught.value)
    with pytest.raises(NoTenantSelected):
        secret_value("acme-only")


def test_create_rotate_delete_are_audited_by_name_without_the_value(world: World) -> None:
    secret = add_secret(world, "rotating", VALUE)
    with tenant_context(world.acme):
        replace_secret_value(secret, value="sk-second-value-42", actor=world.owner)
        assert secret_value("rotating") == "sk-second-value-42"
        delete_secret(secret, actor=world.owner)
        with pytest.raises(SecretMissing):
            secret_value("rotating")
    entries = list(
        AuditEntry.unscoped_all_tenants.filter(target_type="secret").order_by("id").values()
    )
    assert [e["action"] for e in entries] == ["secret.create", "secret.rotate", "secret.delete"]
    assert all(e["tenant_id"] == world.acme.pk and e["actor_id"] == world.owner.pk for e in entries)
    assert entries[0]["after"] == {"name": "rotating"}
    assert entries[2]["before"] == {"name": "rotating"}
    dumped = json.dumps(
        list(AuditEntry.unscoped_all_tenants.values()), default=str, ensure_ascii=False
    )
    assert VALUE not in dumped and "sk-second-value-42" not in dumped
    assert "gAAAA" not in dumped  # not the ciphertext either


def test_replacing_changes_the_ciphertext_and_the_update_time(world: World) -> None:
    secret = add_secret(world, "k", VALUE)
    with tenant_context(world.acme):
        replace_secret_value(secret, value="other-value", actor=world.owner)
    row = stored(world.acme, "k")
    assert row is not None
    assert row.ciphertext != secret.ciphertext and row.updated_at > secret.updated_at
    assert row.created_at == secret.created_at
