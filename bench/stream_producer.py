"""The stream benchmark's producer: the platform's path from engine to feed, minus Celery.

One asyncio loop runs the real SimulatedEngine (one decode loop for every request, as a
GPU worker's engine host does) with one request per run, and hands each TokenDelta to a
publisher's token stream, as workers/operators/llm.py does. Before the tokens each run
gets its step's `running` frame and after them its `done` frame, as the step's
transitions announce them (apps/runs/engine/store.py), so a run's counter exists before
its first token, as it does in a real run (whose source step has published frames by
then).

Ours publishes through apps.live.publisher.FEED: coalescing, numbering, the Redis stream,
the channel layer and the PostgreSQL archive. The floor publishes through FloorPublisher:
the same class's queue, thread and coalescing (so the same frame bodies, as often), but it
numbers frames itself and PUBLISHes each pass's messages on `floor.<run>` in one pipeline:
no script, no Redis stream, no archive.
"""

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

import redis

from apps.live import feed
from apps.live.publisher import FeedPublisher
from bench.inference_kit import full_length_answer
from bench.stream_floor import channel

NODE = "gen"  # the llm.generate node of inference_kit.llm_spec


@dataclass(frozen=True)
class Job:
    """One run's generation: its ids, its prompt and the text the engine will produce."""

    tenant_id: int
    run_id: str
    step_id: str
    prompt: str
    text: str


def full_length_prompts(count: int, tokens: int, tag: str) -> list[tuple[str, str]]:
    """Prompts whose simulated answer is exactly `tokens` long, with that answer."""
    found: list[tuple[str, str]] = []
    for n in range(count * 4 * (tokens + 1)):
        prompt = f"Tell {tag}-{n}"
        words = full_length_answer(prompt, tokens)
        if words is not None:
            found.append((prompt, "".join(words)))
            if len(found) == count:
                return found
    raise RuntimeError(f"found only {len(found)} full-length prompts of {count}")


class FloorPublisher(FeedPublisher):
    """FeedPublisher with its publishing step replaced by plain numbered PUBLISHes."""

    def __init__(self, redis_url: str) -> None:
        super().__init__()
        self.redis_url = redis_url
        self.last_seq: dict[str, int] = {}
        self._client: Any = None

    def _publish(self, outbox: Any) -> None:
        if not outbox.runs:
            return
        if self._client is None:
            self._client = redis.Redis.from_url(self.redis_url)
        pipe = self._client.pipeline(transaction=False)
        for run_id, (_, frames) in outbox.runs.items():
            first = self.last_seq.get(run_id, 0) + 1
            texts = [
                feed.numbered(first + i, json.dumps(body, separators=(",", ":")))
                for i, body in enumerate(frames)
            ]
            self.last_seq[run_id] = first + len(texts) - 1
            pipe.publish(channel(run_id), '{"type":"frames","frames":[' + ",".join(texts) + "]}")
        pipe.execute()


def step_frame(job: Job, status: str) -> dict[str, Any]:
    """What apps.runs.engine.store announces when a step changes status."""
    return {
        "type": "step",
        "step": job.step_id,
        "node": NODE,
        "item": None,
        "status": status,
        "attempt": 1,
    }


def announce(jobs: list[Job], publisher: FeedPublisher, status: str) -> None:
    for job in jobs:
        publisher.frame(job.tenant_id, job.run_id, step_frame(job, status))


@dataclass
class Generated:
    tokens: int  # emitted by the engine, all runs
    first_at: float  # the engine's first token, epoch s
    last_at: float  # its last token
    wall_s: float  # first request to last Finished
    decode_steps: int


async def generate(
    jobs: list[Job], publisher: FeedPublisher, *, rate: float, ttft_s: float, tokens: int
) -> Generated:
    """Every job's generation at once on one engine, each delta to the publisher."""
    from workers.inference.base import Finished, GenerationRequest
    from workers.inference.simulated import SimulatedEngine

    engine = SimulatedEngine(ttft_s=ttft_s, tokens_per_s=rate, batch_capacity=max(len(jobs), 64))
    emitted: list[float] = []

    async def one(job: Job) -> None:
        stream = publisher.stream(
            tenant_id=job.tenant_id, run_id=job.run_id, step_id=job.step_id, node=NODE,
            item=None, attempt=1,
        )  # fmt: skip
        request = GenerationRequest(f"bench-{job.step_id}", job.prompt, tokens)
        async for out in engine.generate(request):
            if isinstance(out, Finished):
                continue
            stream.write(out.text, out.tokens, out.at)
            emitted.append(out.at)
        stream.close()
        publisher.frame(job.tenant_id, job.run_id, step_frame(job, "done"))

    started = time.time()
    try:
        await asyncio.gather(*(one(job) for job in jobs))
    finally:
        await engine.close()
    return Generated(
        tokens=len(emitted),
        first_at=min(emitted, default=started),
        last_at=max(emitted, default=started),
        wall_s=time.time() - started,
        decode_steps=engine.decode_steps,
    )
