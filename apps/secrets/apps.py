from django.apps import AppConfig


class SecretsConfig(AppConfig):
    name = "apps.secrets"

    def ready(self) -> None:
        # A malformed SLUICE_SECRETS_KEY stops every process at start, not a step later.
        from apps.secrets.crypto import check_key

        check_key()
