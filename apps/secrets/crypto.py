"""Encryption of secret values at rest (Fernet: AES-128-CBC with HMAC-SHA256).

The key is SLUICE_SECRETS_KEY when set (a Fernet key), else derived from SECRET_KEY with
HKDF-SHA256, so secrets stay readable exactly as long as SECRET_KEY does. Nothing here logs
or echoes a value or a key.
"""

import base64
import binascii

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

# Changing this label changes the derived key: every stored secret would become unreadable.
HKDF_INFO = b"sluice tenant secrets v1"


class SecretUnreadable(Exception):
    """A stored value does not decrypt with the current key (the key changed, or the row
    was tampered with)."""


def _key() -> bytes:
    configured = settings.SLUICE_SECRETS_KEY
    if configured:
        try:
            raw = base64.urlsafe_b64decode(configured.encode("ascii"))
        except (UnicodeEncodeError, binascii.Error, ValueError):
            raw = b""
        if len(raw) != 32:
            # The value itself is never echoed: it is a key.
            raise ImproperlyConfigured(
                "SLUICE_SECRETS_KEY must be a Fernet key: 32 bytes in URL-safe base64 (44"
                " characters), e.g. from `python -c 'from cryptography.fernet import Fernet;"
                " print(Fernet.generate_key().decode())'`"
            )
        return configured.encode("ascii")
    derived = HKDF(algorithm=SHA256(), length=32, salt=None, info=HKDF_INFO).derive(
        settings.SECRET_KEY.encode()
    )
    return base64.urlsafe_b64encode(derived)


def check_key() -> None:
    """Raises ImproperlyConfigured when SLUICE_SECRETS_KEY is malformed."""
    _key()


def encrypt(plaintext: str) -> str:
    return Fernet(_key()).encrypt(plaintext.encode()).decode("ascii")


def decrypt(token: str, *, name: str) -> str:
    try:
        return Fernet(_key()).decrypt(token.encode("ascii")).decode()
    except InvalidToken:
        raise SecretUnreadable(
            f"secret {name!r} cannot be decrypted with the current key (was SLUICE_SECRETS_KEY"
            " or SECRET_KEY changed?); an owner can set its value again on the Secrets page"
        ) from None
