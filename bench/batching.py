"""Continuous batching through the platform: completion tokens per second through the GPU
worker pool against the same engine driven directly at the same concurrency.

    python -m bench batching [--quick]

For each concurrency C (1, 8, 32, 128), interleaved: the direct side runs C concurrent
`generate()` consumers of one SimulatedEngine (same settings as the worker's) on an
asyncio loop in this process, total tokens over the time from the first request to the
last `Finished`; then Sluice starts one run whose fan-out hands C `llm.generate` steps
(same prompts) to one GPU worker at once (threads pool, one engine per process).

Sluice's figure is the sum of the llm steps' `Step.tokens_out` over the window from the
first llm step's claim (`Step.started_at`) to the last one's commit (`Step.finished_at`):
the GPU pool's throughput, including the steps' staggered claims and commits. The
end-to-end figure (`start_run` to `Run.finished_at`, with the source and fan-out steps)
is reported beside it.
Prompts are chosen so every answer spends its whole token budget, so both sides produce
the same tokens.
"""

import asyncio
import json
import math
import statistics
import time
from typing import Any

from bench.inference_kit import (
    PROMPT,
    TOKENS_PER_S,
    TTFT_MS,
    drive_direct,
    full_length_inputs,
    inference_workers,
    keep_logs,
    rendered_prompt,
    warm_up,
)
from bench.stack import beat, services

CONCURRENCY = (1, 8, 32, 128)
CAPACITY = 128
RUN_TIMEOUT_S = 120.0
TARGET_RATIO = 0.9
# A fan-out item arrives as {"item": <the run input's dict>, "index": i}: the same prompt.
FANOUT_PROMPT = PROMPT.replace("{{ q }}", "{{ item.q }}")


def direct_tokens_per_s(prompts: list[str], max_tokens: int) -> dict[str, float]:
    """Tokens/s of C direct consumers, and a stream's median duration (request to end)."""
    drained, wall_s, _ = asyncio.run(
        drive_direct(prompts, max_tokens, [None] * len(prompts), CAPACITY)
    )
    return {
        "direct": sum(d.tokens for d in drained) / wall_s,
        "direct_stream_s": statistics.median(
            (d.finished_at or math.nan) - d.requested_at for d in drained
        ),
    }


def fanout_spec(max_tokens: int) -> dict[str, Any]:
    """C generations handed to the pool at once: one fan-out creates every llm step in one
    commit, as a batch job does, so what is measured is the GPU pool, not the CPU workers
    starting C separate runs."""
    return {
        "nodes": [
            {"id": "in", "type": "source.manual"},
            {"id": "split", "type": "fanout.split", "config": {"field": "items"}},
            {
                "id": "gen",
                "type": "llm.generate",
                "config": {"prompt": FANOUT_PROMPT, "max_tokens": max_tokens},
            },
        ],
        "edges": [["in", "split"], ["split", "gen"]],
        "policies": {"max_fanout": max(CONCURRENCY)},
    }


def sluice_tokens_per_s(version: Any, inputs: list[dict[str, Any]]) -> dict[str, float]:
    """Tokens/s over the llm steps' window and end to end for one fan-out of C items, with
    how the window splits: the spread of the steps' claims and a step's median duration."""
    from apps.runs.models import Step
    from apps.runs.services import start_run
    from tests.runs.helpers import wait_for_run

    first_start = time.time()
    run = start_run(version=version, payload={"items": inputs}, actor="bench")
    run = wait_for_run(run, timeout=RUN_TIMEOUT_S)  # e2e uses finished_at, not the poll
    if run.status != "succeeded":
        raise RuntimeError(f"the run did not succeed: {run.status} {run.error}")
    steps = list(
        Step.objects.filter(run_id=run.id, node_id="gen").values_list(
            "tokens_out", "started_at", "finished_at"
        )
    )
    tokens = sum(t for t, _, _ in steps)
    window = max(f for _, _, f in steps) - min(s for _, s, _ in steps)
    assert run.finished_at is not None
    e2e = run.finished_at.timestamp() - first_start
    claims = [s for _, s, _ in steps]
    split = Step.objects.get(run_id=run.id, node_id="split")
    assert split.finished_at is not None
    return {
        "first_claim_s": min(claims).timestamp() - first_start,
        "fanout_commit_s": split.finished_at.timestamp() - first_start,
        "sluice": tokens / window.total_seconds(),
        "e2e": tokens / e2e,
        "claim_spread_s": (max(claims) - min(claims)).total_seconds(),
        "step_s": statistics.median((f - s).total_seconds() for _, s, f in steps),
    }


def measure(
    concurrency: tuple[int, ...], rounds: int, version: Any, inputs: list[dict[str, Any]],
    max_tokens: int,
) -> dict[int, dict[str, list[float]]]:  # fmt: skip
    keys = (
        "sluice", "e2e", "direct", "claim_spread_s", "step_s", "fanout_commit_s",
        "first_claim_s", "direct_stream_s",
    )  # fmt: skip
    figures: dict[int, dict[str, list[float]]] = {c: {k: [] for k in keys} for c in concurrency}
    prompts = [rendered_prompt(payload) for payload in inputs]
    for _ in range(rounds):
        for c in concurrency:  # interleaved: direct, then Sluice, at each concurrency
            measured = direct_tokens_per_s(prompts[:c], max_tokens)
            measured.update(sluice_tokens_per_s(version, inputs[:c]))
            for key, value in measured.items():
                figures[c][key].append(value)
    return figures


def summarize(
    figures: dict[int, dict[str, list[float]]], rounds: int, max_tokens: int
) -> dict[str, Any]:
    result: dict[str, Any] = {"bench": "batching"}
    ratios, e2e_ratios = [], []
    for c, sides in figures.items():
        ours = statistics.median(sides["sluice"])
        e2e = statistics.median(sides["e2e"])
        direct = statistics.median(sides["direct"])
        result[f"tokens_per_s_c{c}"] = round(ours, 1)
        result[f"direct_tokens_per_s_c{c}"] = round(direct, 1)
        result[f"ratio_c{c}"] = round(ours / direct, 3)
        result[f"e2e_tokens_per_s_c{c}"] = round(e2e, 1)
        result[f"e2e_ratio_c{c}"] = round(e2e / direct, 3)
        result[f"claim_spread_s_c{c}"] = round(statistics.median(sides["claim_spread_s"]), 3)
        result[f"step_s_p50_c{c}"] = round(statistics.median(sides["step_s"]), 3)
        for key in ("fanout_commit_s", "first_claim_s", "direct_stream_s"):
            result[f"{key}_c{c}"] = round(statistics.median(sides[key]), 3)
        ratios.append(ours / direct)
        e2e_ratios.append(e2e / direct)
    result["ratio_vs_direct"] = round(min(ratios), 3)
    result["e2e_ratio_vs_direct"] = round(min(e2e_ratios), 3)
    result.update(
        target_ratio=TARGET_RATIO,
        rounds=rounds,
        max_tokens=max_tokens,
        answer_tokens=max_tokens,
        tokens_per_s=TOKENS_PER_S,
        ttft_ms=TTFT_MS,
        batch_capacity=CAPACITY,
    )
    return result


def print_table(result: dict[str, Any]) -> None:
    print(
        f"streams of {result['max_tokens']} tokens at {TOKENS_PER_S:.0f} tokens/s per stream"
        f" (TTFT {TTFT_MS:.0f} ms, batch capacity {CAPACITY}), median of"
        f" {result['rounds']} round(s)"
    )
    print(
        f"{'C':>5}{'direct tok/s':>14}{'Sluice tok/s':>14}{'ratio':>8}{'e2e tok/s':>11}"
        f"{'e2e':>7}{'claim spread s':>16}{'step s p50':>12}{'direct stream s':>17}"
    )
    for c in CONCURRENCY:
        print(
            f"{c:>5}{result[f'direct_tokens_per_s_c{c}']:>14}{result[f'tokens_per_s_c{c}']:>14}"
            f"{result[f'ratio_c{c}']:>8}{result[f'e2e_tokens_per_s_c{c}']:>11}"
            f"{result[f'e2e_ratio_c{c}']:>7}{result[f'claim_spread_s_c{c}']:>16}"
            f"{result[f'step_s_p50_c{c}']:>12}{result[f'direct_stream_s_c{c}']:>17}"
        )
    print(
        "Sluice tok/s: llm steps' tokens_out over first claim to last commit (Step.started_at"
        " .. Step.finished_at); e2e: start_run to Run.finished_at (one fan-out of C items);"
        " claim spread: first to last llm step claim; step s: an llm step's claim to commit"
    )
    print(
        f"target: ratio ≥ {TARGET_RATIO} at every concurrency"
        f" (lowest measured {result['ratio_vs_direct']},"
        f" end to end {result['e2e_ratio_vs_direct']})"
    )


def main(*, quick: bool) -> int:
    max_tokens, rounds = (200, 1) if quick else (400, 3)
    with services("batching") as root, beat(root):
        from apps.graphs.services import create_graph
        from apps.tenants.context import tenant_context
        from apps.tenants.services import create_tenant

        inputs = full_length_inputs(max(CONCURRENCY), max_tokens, "batching")
        tenant = create_tenant(slug="bench", name="Bench", actor="bench")
        try:
            with (
                inference_workers(root, threads=CAPACITY + 8, batch_capacity=CAPACITY),
                tenant_context(tenant),
            ):
                warm_up()
                graph = create_graph(
                    slug="batching", name="Batching", spec=fanout_spec(max_tokens), actor="bench"
                )
                figures = measure(CONCURRENCY, rounds, graph.live_version(), inputs, max_tokens)
        finally:
            logs = keep_logs(root)
    result = summarize(figures, rounds, max_tokens)
    print_table(result)
    print(f"worker logs: {logs}")
    print("RESULT " + json.dumps(result))
    return 0
