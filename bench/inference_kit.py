"""What the inference benchmarks share: the simulated engine's pace, prompts whose answers
are exactly max_tokens long, and the baseline: the same engine driven directly in this
process by concurrent consumers, each of which may "leave" without aborting."""

import asyncio
import hashlib
import math
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TOKENS_PER_S = 50.0
TTFT_MS = 100.0
PROMPT = "Tell {{ q }}"


def gpu_env(batch_capacity: int) -> dict[str, str]:
    """The GPU worker's simulated engine and its connection handling."""
    return {
        "SLUICE_SIM_TOKENS_PER_S": str(TOKENS_PER_S),
        "SLUICE_SIM_TTFT_MS": str(TTFT_MS),
        "SLUICE_SIM_BATCH_CAPACITY": str(batch_capacity),
        "SLUICE_WORKER_DB_REUSE_MAX": "0",
    }


def llm_spec(max_tokens: int, policies: dict[str, Any] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "nodes": [
            {"id": "in", "type": "source.manual"},
            {
                "id": "gen",
                "type": "llm.generate",
                "config": {"prompt": PROMPT, "max_tokens": max_tokens},
            },
        ],
        "edges": [["in", "gen"]],
    }
    if policies:
        spec["policies"] = policies
    return spec


def rendered_prompt(payload: dict[str, Any]) -> str:
    """The prompt exactly as the llm.generate step renders it."""
    from workers.operators.builtin import template_variables
    from workers.operators.templating import render

    return render(PROMPT, template_variables(payload))


def full_length_answer(prompt: str, max_tokens: int) -> list[str] | None:
    """The simulated engine's answer to `prompt` when it is exactly `max_tokens` long, else
    None. A cheap hash test (the engine spends between half and all of the budget, by the
    same hash) rules most prompts out; the engine's own `tokens_for` decides."""
    from workers.inference.simulated import tokens_for

    half = max(1, max_tokens // 2)
    seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big")
    if half + seed % (max_tokens - half + 1) != max_tokens:
        return None
    words = tokens_for(prompt, max_tokens)
    return words if len(words) == max_tokens else None


def full_length_inputs(count: int, max_tokens: int, tag: str) -> list[dict[str, Any]]:
    """Run inputs whose simulated answer is exactly `max_tokens` long."""
    found: list[dict[str, Any]] = []
    for n in range(count * 2000):
        payload = {"q": f"{tag}-{n}"}
        if full_length_answer(rendered_prompt(payload), max_tokens) is not None:
            found.append(payload)
            if len(found) == count:
                return found
    raise RuntimeError(f"found only {len(found)} full-length prompts of {count}")


def pct(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def rounded(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


def keep_logs(root: Path) -> Path:
    """The stack's folder is removed at exit; its worker logs are kept here."""
    kept = root.parent / "log" / root.name
    kept.mkdir(parents=True, exist_ok=True)
    for log in root.glob("*.log"):
        shutil.copy(log, kept / log.name)
    return kept


def warm_up() -> None:
    """One short generation through the stack first, so the GPU worker's engine loop,
    control subscription and connections exist before anything is measured."""
    from apps.graphs.services import create_graph
    from apps.runs.services import start_run
    from tests.runs.helpers import wait_for_run

    graph = create_graph(slug="warm-up", name="Warm-up", spec=llm_spec(4), actor="bench")
    run = start_run(version=graph.live_version(), payload={"q": "warm-up"}, actor="bench")
    run = wait_for_run(run, timeout=60)
    if run.status != "succeeded":
        raise RuntimeError(f"the warm-up run ended {run.status}: {run.error}")


@dataclass
class Leave:
    """When a baseline client walks away: `after_s` past its first token, or after
    receiving `after_tokens` tokens."""

    after_s: float | None = None
    after_tokens: int | None = None


@dataclass
class Drained:
    requested_at: float = 0.0
    tokens: int = 0
    wasted: int = 0
    first_at: float | None = None
    leave_at: float | None = None
    last_at: float | None = None
    finished_at: float | None = None


async def consume(engine: Any, request: Any, leave: Leave | None) -> Drained:
    """Reads a stream to its end, counting what was produced after the client left."""
    from workers.inference.base import Finished

    drained = Drained(requested_at=time.time())
    async for item in engine.generate(request):
        if isinstance(item, Finished):
            drained.finished_at = item.at
            break
        if drained.first_at is None:
            drained.first_at = item.at
            if leave is not None and leave.after_s is not None:
                drained.leave_at = item.at + leave.after_s
        if drained.leave_at is not None and item.at > drained.leave_at:
            drained.wasted += item.tokens
        drained.tokens += item.tokens
        drained.last_at = item.at
        if leave is not None and leave.after_tokens == drained.tokens:
            drained.leave_at = item.at
    return drained


async def drive_direct(
    prompts: list[str], max_tokens: int, leaves: list[Leave | None], capacity: int
) -> tuple[list[Drained], float, int]:
    """`len(prompts)` concurrent consumers of one SimulatedEngine on this loop. Returns what
    each drained, the wall time from the first request to the last Finished, and the
    engine's decode steps."""
    from workers.inference.base import GenerationRequest
    from workers.inference.simulated import SimulatedEngine

    engine = SimulatedEngine(
        ttft_s=TTFT_MS / 1000, tokens_per_s=TOKENS_PER_S, batch_capacity=capacity
    )
    started = time.time()
    try:
        drained = await asyncio.gather(
            *(
                consume(engine, GenerationRequest(f"direct-{i}", prompt, max_tokens), leave)
                for i, (prompt, leave) in enumerate(zip(prompts, leaves, strict=True))
            )
        )
    finally:
        await engine.close()
    wall = max(d.finished_at or time.time() for d in drained) - started
    return list(drained), wall, engine.decode_steps


@contextmanager
def inference_workers(root: Path, *, threads: int, batch_capacity: int) -> Iterator[None]:
    """A CPU worker for sources and fan-outs, and one GPU worker (threads) whose simulated
    engine runs at the benchmarks' pace."""
    from bench.stack import worker
    from workers.queues import CPU_WORKER_QUEUES

    gpu = worker(
        root, "gpu", ["gpu"], [], concurrency=threads, pool="threads", env=gpu_env(batch_capacity)
    )
    with worker(root, "cpu", CPU_WORKER_QUEUES, [], concurrency=2), gpu:
        yield
