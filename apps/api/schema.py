"""The OpenAPI document's conventions: both ways to authenticate, tags by resource, and the
problem+json answers every operation may give, so clients (and schemathesis) know them."""

from typing import Any, Literal

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.openapi import AutoSchema
from drf_spectacular.utils import OpenApiParameter
from rest_framework import serializers

PROBLEM = "application/problem+json"
# The errors any operation may answer, beyond the ones it declares itself.
COMMON_ERRORS = {
    "400": "Invalid request: `errors` names each field at fault.",
    "401": "No credentials, or an unknown or revoked API key.",
    "403": "The key lacks the scope, or the member's role is too low.",
    "404": "Not found, or not this tenant's.",
    "429": "Over a rate or admission limit; retry after `Retry-After` seconds.",
}
WRITE_ERRORS = {"409": "Conflicts with the current state (the detail says which)."}


IDEMPOTENCY_PARAMETER = OpenApiParameter(
    "Idempotency-Key",
    str,
    OpenApiParameter.HEADER,
    description=(
        "Up to 255 characters. The same key and body get the first reply again"
        " (`Idempotent-Replayed: true`); the same key with another body is a 409."
    ),
)


class FieldErrorSerializer(serializers.Serializer[Any]):
    field = serializers.CharField()
    message = serializers.CharField()


class ProblemSerializer(serializers.Serializer[Any]):
    type = serializers.CharField()
    title = serializers.CharField()
    status = serializers.IntegerField()
    detail = serializers.CharField(required=False)
    code = serializers.CharField(required=False)
    # DRF's metaclass takes declared fields off the class, so the name does not clash.
    errors = FieldErrorSerializer(many=True, required=False)  # type: ignore[assignment]


class SluiceSchema(AutoSchema):
    def get_tags(self) -> list[str]:
        parts = self._tokenize_path()  # ["api", "graphs", …] without parameters
        return parts[1:2] or parts[:1]

    def get_override_parameters(self) -> list[Any]:
        parameters = list(super().get_override_parameters())
        if self.method == "POST" and getattr(getattr(self.view, "post", None), "idempotent", False):
            parameters.append(IDEMPOTENCY_PARAMETER)
        return parameters

    def _get_response_bodies(
        self, direction: Literal["request", "response"] = "response"
    ) -> dict[str, Any]:
        bodies: dict[str, Any] = super()._get_response_bodies(direction)
        errors = dict(COMMON_ERRORS)
        if self.method != "GET":
            errors.update(WRITE_ERRORS)
        for code, description in errors.items():
            if code not in bodies:
                body = self._get_response_for_code(ProblemSerializer, code, [PROBLEM], direction)
                bodies[code] = {**body, "description": description}
        return bodies


class ApiKeyScheme(OpenApiAuthenticationExtension):
    target_class = "apps.api.auth.ApiKeyAuthentication"
    name = "apiKey"

    def get_security_definition(self, auto_schema: AutoSchema) -> dict[str, str]:
        return {
            "type": "http",
            "scheme": "bearer",
            "description": "An API key from Settings → API keys: `Bearer sk_…`.",
        }


class SessionScheme(OpenApiAuthenticationExtension):
    target_class = "apps.api.auth.SessionAuthentication"
    name = "session"

    def get_security_definition(self, auto_schema: AutoSchema) -> dict[str, str]:
        return {"type": "apiKey", "in": "cookie", "name": "sessionid"}
