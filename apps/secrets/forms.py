"""Forms of the secrets page. The value goes in a password input that is never filled back
in, so a page re-rendered with an error does not echo it."""

from django import forms

from workers.secret_names import NAME_RULE

VALUE_WIDGET = forms.PasswordInput(
    render_value=False,
    # new-password: browsers must not fill in the signed-in person's saved login here.
    attrs={"autocomplete": "new-password", "spellcheck": "false"},
)


class NewSecretForm(forms.Form):
    name = forms.CharField(
        label="Name",
        max_length=64,
        widget=forms.TextInput(attrs={"autocomplete": "off", "spellcheck": "false"}),
        help_text=f"How graphs refer to it: {NAME_RULE}.",
    )
    value = forms.CharField(
        label="Value",
        strip=False,  # the service strips, so its errors describe what was typed
        widget=VALUE_WIDGET,
        help_text="Stored encrypted; it cannot be shown again, only replaced.",
    )


class ReplaceValueForm(forms.Form):
    value = forms.CharField(
        label="New value",
        strip=False,
        widget=VALUE_WIDGET,
        help_text="Graphs that use this secret send the new value from their next call.",
    )
