"""Forms of the graph pages. They parse JSON and say where it broke; what the JSON means is
checked by the services (start_run, add_version), whose errors the views attach here."""

import json
from typing import Any

from django import forms

JSON_TEXTAREA = {"rows": 12, "spellcheck": "false", "class": "code"}


def parse_json(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise forms.ValidationError(
            f"{what} is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        ) from exc


def pretty_json(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=False)


class FocusFirstErrorForm(forms.Form):
    """Autofocuses the first field that gets an error, so the browser scrolls to it and a
    keyboard user lands on it; no script needed."""

    def add_error(self, field: str | None, error: Any) -> None:
        super().add_error(field, error)
        if field in self.fields and not any(
            "autofocus" in f.widget.attrs for f in self.fields.values()
        ):
            self.fields[field].widget.attrs["autofocus"] = True


class RunInputForm(FocusFirstErrorForm):
    payload = forms.CharField(
        label="Input (JSON)",
        strip=False,  # keeps JSON error positions true to what was typed
        widget=forms.Textarea(attrs=JSON_TEXTAREA),
        help_text="A JSON object; the source node's input schema, if any, is checked.",
    )

    def clean_payload(self) -> Any:
        return parse_json(self.cleaned_data["payload"], "The input")


class NewVersionForm(FocusFirstErrorForm):
    spec = forms.CharField(
        label="Spec (JSON)",
        strip=False,
        widget=forms.Textarea(attrs={**JSON_TEXTAREA, "rows": 24}),
    )
    note = forms.CharField(
        label="Note",
        max_length=500,
        required=False,
        help_text="What changed, for the version list.",
    )

    def clean_spec(self) -> Any:
        return parse_json(self.cleaned_data["spec"], "The spec")
