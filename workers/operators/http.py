"""Operators that call out over HTTP: `tool.http` (a JSON request whose response joins the
payload) and `sink.webhook` (delivers the payload). Both go through the effect ledger, so a
call completes at most once per input however often the step is attempted, and carry the
ledger key as Idempotency-Key so the receiver can drop a repeat of a call whose outcome we
never learnt. Both refuse private, loopback and link-local addresses unless the tenant's
allowlist names the host (workers/outbound.py).

With `auth_secret` they send `Authorization: Bearer <value>` from the tenant's secret of that
name, read at call time (so a rotation applies from the next call). The value is removed from
everything the step keeps: errors, the effect's error and result, the step's output."""

from typing import Any

from django.conf import settings

from workers.operators.base import (
    JSON,
    InputEvent,
    Operator,
    Output,
    PermanentError,
    SecretNotAvailable,
    SpecIssue,
    StepContext,
    StepResult,
    register,
)
from workers.operators.builtin import FIELD_NAME, only_input, template_variables
from workers.operators.templating import render, syntax_error
from workers.outbound import HttpResponse, classify, request_json, resolve_target
from workers.secret_names import NAME_SCHEMA

DEFAULT_TIMEOUT_S = 10.0
RESPONSE_EXCERPT_CHARS = 300


class HttpRetryable(Exception):
    """5xx, 429 or a timeout: the step is tried again under its retry policy."""


URL_SCHEMA: JSON = {"type": "string", "minLength": 1, "maxLength": 2000}
TIMEOUT_SCHEMA: JSON = {"type": "number", "exclusiveMinimum": 0, "maximum": 60}
AUTH_SECRET_SCHEMA: JSON = {
    **NAME_SCHEMA,
    "description": "Name of a tenant secret sent as `Authorization: Bearer <value>`.",
}
REDACTED = "***"


class HttpOperator(Operator):
    effect_name = "http"
    method_default = "POST"

    def check(
        self, node_id: str, config: JSON, nodes: dict[str, JSON], parents: dict[str, set[str]]
    ) -> list[SpecIssue]:
        problem = syntax_error(config["url"])
        if problem:
            return [SpecIssue("url", problem)]
        literal_start = config["url"].split("{{")[0]
        if not literal_start.startswith(("http://", "https://")):
            return [SpecIssue("url", "must start with http:// or https://")]
        return []

    def call(self, ctx: StepContext, payload: JSON) -> Any:
        """Performs the request through the ledger; returns the response's JSON (or text)."""
        url = render(ctx.config["url"], template_variables(payload)).strip()
        method = ctx.config.get("method", self.method_default)
        body = None if method in ("GET", "DELETE") else payload
        # Refused before the ledger: a forbidden address is a config error, not an effect.
        target = resolve_target(url, ctx.outbound_allowlist)
        timeout = min(
            float(ctx.config.get("timeout_s", DEFAULT_TIMEOUT_S)),
            settings.SLUICE_HTTP_MAX_TIMEOUT_S,
        )
        # Also before the ledger: a missing secret is fixed on the Secrets page, not retried.
        secret = _auth_secret(ctx, ctx.config.get("auth_secret"))
        ctx.heartbeat()

        def send(idempotency_key: str) -> JSON:
            headers = {"Idempotency-Key": idempotency_key}
            if secret:
                headers["Authorization"] = f"Bearer {secret}"
            try:
                response = request_json(
                    target, method=method, body=body, headers=headers, timeout_s=timeout
                )
                result = {"status": response.status, "body": _checked_body(response)}
            except Exception as exc:
                if secret and secret in str(exc):
                    raise _redacted_error(exc, secret) from None
                raise
            return redact(result, secret) if secret else result

        request = {"method": method, "url": url, "body": body}
        recorded = ctx.perform_effect(self.effect_name, request, send)
        return recorded["body"]


def _auth_secret(ctx: StepContext, name: str | None) -> str | None:
    """The value of the tenant's secret `name`, from the step's context."""
    if not name:
        return None
    try:
        value = ctx.read_secret(name)
    except SecretNotAvailable as exc:
        raise PermanentError(f"auth_secret: {exc}") from None
    if not value.isascii():
        raise PermanentError(
            f"auth_secret: secret {name!r} has non-ASCII characters and cannot be sent in an"
            " Authorization header; an owner can replace its value on the Secrets page"
        )
    return value


def redact(value: Any, secret: str) -> Any:
    """`value` (JSON) with every occurrence of `secret` in its strings replaced: a receiver
    that echoes the request's headers must not put the secret into the step's output."""
    if isinstance(value, str):
        return value.replace(secret, REDACTED)
    if isinstance(value, list):
        return [redact(item, secret) for item in value]
    if isinstance(value, dict):
        return {redact(k, secret): redact(v, secret) for k, v in value.items()}
    return value


def _redacted_error(exc: Exception, secret: str) -> Exception:
    """The same kind of failure (permanent or retryable), with the secret cut out."""
    message = str(exc).replace(secret, REDACTED)
    if isinstance(exc, PermanentError):
        return PermanentError(message)
    if isinstance(exc, HttpRetryable):
        return HttpRetryable(message)
    return HttpRetryable(f"{type(exc).__name__}: {message}")


def _checked_body(response: HttpResponse) -> Any:
    outcome = classify(response)
    if outcome == "ok":
        if not response.body:
            return None
        is_json = response.headers.get("content-type", "").startswith("application/json")
        return response.json() if is_json else response.text
    excerpt = response.text[:RESPONSE_EXCERPT_CHARS]
    message = f"{response.url} answered {response.status}: {excerpt}"
    if outcome == "retry":
        raise HttpRetryable(message)
    raise PermanentError(message)


@register
class HttpTool(HttpOperator):
    type_name = "tool.http"
    description = (
        "Sends the payload as JSON to a URL (with an Idempotency-Key) and adds the JSON"
        " response to the payload. Retries on 5xx, 429 and timeouts only."
    )
    config_schema = {
        "type": "object",
        "additionalProperties": False,
        "required": ["url"],
        "properties": {
            "url": URL_SCHEMA,
            "method": {"enum": ["POST", "PUT", "PATCH", "GET", "DELETE"]},
            "timeout_s": TIMEOUT_SCHEMA,
            "output": FIELD_NAME,
            "auth_secret": AUTH_SECRET_SCHEMA,
        },
    }
    effect_name = "tool.http"

    def run(self, ctx: StepContext, inputs: list[InputEvent]) -> StepResult:
        payload = only_input(inputs).payload
        response = self.call(ctx, payload)
        return StepResult(
            outputs=[Output({**payload, ctx.config.get("output", "response"): response})]
        )


@register
class Webhook(HttpOperator):
    type_name = "sink.webhook"
    description = "Delivers the payload as a JSON POST to a URL, once, with an Idempotency-Key."
    config_schema = {
        "type": "object",
        "additionalProperties": False,
        "required": ["url"],
        "properties": {
            "url": URL_SCHEMA,
            "timeout_s": TIMEOUT_SCHEMA,
            "auth_secret": AUTH_SECRET_SCHEMA,
        },
    }
    effect_name = "sink.webhook"

    def run(self, ctx: StepContext, inputs: list[InputEvent]) -> StepResult:
        payload = only_input(inputs).payload
        self.call(ctx, payload)
        return StepResult(outputs=[Output(payload)])
