"""Forms of the tenant pages. They check types and lengths; what the values mean (a taken
name, the last owner, an unknown scope) is checked by the services, whose `Refused` errors
`attach` puts on the fields they name."""

from typing import Any

from django import forms
from django.contrib.auth import get_user_model

from apps.graphs.forms import FocusFirstErrorForm
from apps.tenants.api_keys import KEY_NAME_MAX
from apps.tenants.keys import SCOPES
from apps.tenants.models import Role
from apps.tenants.quotas import FEED_RETENTION_DAYS_MAX, MAX_ACTIVE_RUNS, MAX_USD
from apps.tenants.services import TENANT_NAME_MAX, Refused

ROLE_CHOICES = [(role.value, role.label) for role in Role]
ROLE_HELP = (
    "Viewers read; operators also start and cancel runs; editors also change graphs; "
    "owners also manage members, keys and settings."
)


def attach(form: forms.Form, refused: Refused) -> None:
    """Puts a service's refusal on the form's fields (unknown fields: the whole form)."""
    for field, messages in refused.errors.items():
        form.add_error(field if field in form.fields else None, messages)


class SignupForm(FocusFirstErrorForm):
    username = forms.CharField(
        label="Username",
        max_length=150,
        help_text="Letters, digits and @ . + - _ only.",
        widget=forms.TextInput(attrs={"autocomplete": "username", "autofocus": True}),
    )
    email = forms.EmailField(
        label="Email", widget=forms.EmailInput(attrs={"autocomplete": "email"})
    )
    password = forms.CharField(
        label="Password",
        strip=False,
        help_text="At least 8 characters, and not a common password.",
        widget=forms.PasswordInput(attrs={"autocomplete": "new-password"}),
    )
    tenant_name = forms.CharField(
        label="Organisation or team name",
        max_length=TENANT_NAME_MAX,
        help_text="Your tenant: graphs, runs, keys and members belong to it. "
        "You can create more later.",
    )

    def __init__(self, *args: Any, joining: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if joining:  # an invite names the tenant
            del self.fields["tenant_name"]

    def clean_username(self) -> str:
        username: str = self.cleaned_data["username"].strip()
        validator = get_user_model().username_validator
        validator(username)
        return username


class TenantForm(FocusFirstErrorForm):
    name = forms.CharField(
        label="Name",
        max_length=TENANT_NAME_MAX,
        help_text="Its address name (slug) is made from it and must be unique.",
        widget=forms.TextInput(attrs={"autofocus": True}),
    )


class SwitchForm(forms.Form):
    tenant = forms.IntegerField(min_value=1)
    next = forms.CharField(required=False)


class RoleForm(forms.Form):
    role = forms.ChoiceField(label="Role", choices=ROLE_CHOICES)


class InviteForm(FocusFirstErrorForm):
    email = forms.EmailField(label="Email", widget=forms.EmailInput(attrs={"autocomplete": "off"}))
    role = forms.ChoiceField(
        label="Role", choices=ROLE_CHOICES, initial=Role.VIEWER.value, help_text=ROLE_HELP
    )


class ApiKeyForm(FocusFirstErrorForm):
    name = forms.CharField(
        label="Name",
        max_length=KEY_NAME_MAX,
        help_text="Where the key is used, e.g. “nightly import”.",
    )
    scopes = forms.MultipleChoiceField(
        label="Scopes",
        choices=list(SCOPES.items()),
        widget=forms.CheckboxSelectMultiple,
        error_messages={"required": "Choose at least one scope."},
    )


def _usd_field(label: str, help_text: str) -> forms.DecimalField:
    return forms.DecimalField(
        label=label,
        required=False,
        min_value=0,
        max_value=MAX_USD,
        decimal_places=6,
        help_text=help_text,
        widget=forms.NumberInput(attrs={"step": "0.01", "min": "0", "inputmode": "decimal"}),
    )


class SettingsForm(FocusFirstErrorForm):
    monthly_budget_usd = _usd_field(
        "Monthly budget (USD)",
        "Inference spend allowed per calendar month (UTC) across all runs; running "
        "generations stop when it is reached. Empty: no limit.",
    )
    max_run_budget_usd = _usd_field(
        "Largest budget per run (USD)",
        "The most a graph's policies.budget_usd may be; graphs without one are refused "
        "while this is set. Empty: no limit.",
    )
    max_active_runs = forms.IntegerField(
        label="Active runs at once",
        required=False,
        min_value=1,
        max_value=MAX_ACTIVE_RUNS,
        help_text="Runs queued or running at the same time; starting another is refused. "
        "Empty: no limit.",
        widget=forms.NumberInput(attrs={"min": "1", "step": "1"}),
    )
    feed_retention_days = forms.IntegerField(
        label="Live feed retention (days)",
        min_value=1,
        max_value=FEED_RETENTION_DAYS_MAX,
        error_messages={"required": "Enter how many days to keep a finished run's live feed."},
        help_text="How long a finished run's page can replay its token stream. After that the "
        "streamed text is deleted and the page shows the run's final outputs instead. "
        f"1 to {FEED_RETENTION_DAYS_MAX}.",
        widget=forms.NumberInput(
            attrs={"min": "1", "max": str(FEED_RETENTION_DAYS_MAX), "step": "1"}
        ),
    )
