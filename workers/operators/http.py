"""Operators that call out over HTTP: `tool.http` (a JSON request whose response joins the
payload) and `sink.webhook` (delivers the payload). Both go through the effect ledger, so a
call completes at most once per input however often the step is attempted, and carry the
ledger key as Idempotency-Key so the receiver can drop a repeat of a call whose outcome we
never learnt. Both refuse private, loopback and link-local addresses unless the tenant's
allowlist names the host (workers/outbound.py)."""

from typing import Any

from django.conf import settings

from workers.operators.base import (
    JSON,
    InputEvent,
    Operator,
    Output,
    PermanentError,
    SpecIssue,
    StepContext,
    StepResult,
    register,
)
from workers.operators.builtin import FIELD_NAME, only_input, template_variables
from workers.operators.templating import render, syntax_error
from workers.outbound import HttpResponse, classify, request_json, resolve_target

DEFAULT_TIMEOUT_S = 10.0
RESPONSE_EXCERPT_CHARS = 300


class HttpRetryable(Exception):
    """5xx, 429 or a timeout: the step is tried again under its retry policy."""


URL_SCHEMA: JSON = {"type": "string", "minLength": 1, "maxLength": 2000}
TIMEOUT_SCHEMA: JSON = {"type": "number", "exclusiveMinimum": 0, "maximum": 60}


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
        ctx.heartbeat()

        def send(idempotency_key: str) -> JSON:
            response = request_json(
                target,
                method=method,
                body=body,
                headers={"Idempotency-Key": idempotency_key},
                timeout_s=timeout,
            )
            return {"status": response.status, "body": _checked_body(response)}

        request = {"method": method, "url": url, "body": body}
        recorded = ctx.perform_effect(self.effect_name, request, send)
        return recorded["body"]


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
        "properties": {"url": URL_SCHEMA, "timeout_s": TIMEOUT_SCHEMA},
    }
    effect_name = "sink.webhook"

    def run(self, ctx: StepContext, inputs: list[InputEvent]) -> StepResult:
        payload = only_input(inputs).payload
        self.call(ctx, payload)
        return StepResult(outputs=[Output(payload)])
