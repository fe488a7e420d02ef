import time

from workers.engines.models import MODELS, simulated_engine
from workers.operators.base import (
    JSON,
    InputEvent,
    Operator,
    Output,
    SpecIssue,
    StepContext,
    StepResult,
    UsageRecord,
    register,
)
from workers.operators.builtin import FIELD_NAME, only_input, template_variables
from workers.operators.templating import render, syntax_error
from workers.queues import Queue


@register
class Generate(Operator):
    type_name = "llm.generate"
    description = "Generates text from a prompt template with a registered model."
    default_queue = Queue.GPU
    config_schema = {
        "type": "object",
        "additionalProperties": False,
        "required": ["prompt"],
        "properties": {
            "model": {"type": "string", "default": "default"},
            "prompt": {"type": "string", "minLength": 1},
            "max_tokens": {"type": "integer", "minimum": 1, "maximum": 8192},
            "output": FIELD_NAME,
        },
    }

    def check(
        self, node_id: str, config: JSON, nodes: dict[str, JSON], parents: dict[str, set[str]]
    ) -> list[SpecIssue]:
        issues = []
        model = config.get("model", "default")
        if model not in MODELS:
            known = ", ".join(sorted(MODELS))
            issues.append(SpecIssue("model", f"unknown model {model!r} (known: {known})"))
        problem = syntax_error(config["prompt"])
        if problem:
            issues.append(SpecIssue("prompt", problem))
        return issues

    def run(self, ctx: StepContext, inputs: list[InputEvent]) -> StepResult:
        payload = only_input(inputs).payload
        model = MODELS[ctx.config.get("model", "default")]
        prompt = render(ctx.config["prompt"], template_variables(payload))
        engine = simulated_engine()
        started = time.monotonic()
        tokens = list(
            engine.stream(
                prompt,
                ctx.config.get("max_tokens", 256),
                attempt=ctx.attempt,
                between_tokens=ctx.heartbeat,
            )
        )
        # The simulated engine's tokens are words; a prompt's word count stands in for its tokens.
        tokens_in = len(prompt.split())
        usage = UsageRecord(
            model=model.name,
            engine=engine.name,
            tokens_in=tokens_in,
            tokens_out=len(tokens),
            engine_seconds=time.monotonic() - started,
            cost_usd=model.cost(tokens_in, len(tokens)),
        )
        output = {**payload, ctx.config.get("output", "text"): "".join(tokens)}
        return StepResult(outputs=[Output(output)], usage=usage)
