"""A stand-in for a GPU engine that behaves like one where it matters to the platform.

One decode loop serves every active request (continuous batching): each decode step emits
one token to every request past its time to first token. Up to `batch_capacity` requests a
step takes 1/tokens_per_s; beyond it the step slows in proportion, as a saturated GPU does.
Tokens are produced by the loop whether anyone reads them or not, so a client that walks
away without aborting leaves a zombie generating, which is what the zombie benchmark's
baseline measures. Text is a pure function of the prompt, so tests and demos repeat.
Injected faults stand in for an overloaded or failing engine. The UI labels its output.
"""

import asyncio
import hashlib
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings

from workers.inference.base import (
    Engine,
    EngineUnavailable,
    Finished,
    GenerationRequest,
    TokenDelta,
)

_WORDS = [
    "stream", "graph", "token", "batch", "window", "event", "lineage", "budget", "worker",
    "queue", "signal", "model", "river", "sluice", "gate", "flow", "current", "channel", "harbor",
    "summary", "insight", "detail", "result", "answer", "pattern", "careful", "quick", "steady",
    "clear", "bright", "measured", "durable", "exact", "honest",
]  # fmt: skip

_STALL_WORDS = {"timeout": "timed out", "stall": "stalled"}
FAULT_KINDS = ("unavailable", "rate_limited", "timeout", "stall", "drop")


@dataclass(frozen=True)
class Faults:
    """Which requests fail and how. A request fails when its attempt is among the first
    `first_attempts`, or by chance `rate` (decided from the request id, so repeatable)."""

    kind: str = "unavailable"
    first_attempts: int = 0
    rate: float = 0.0
    after_tokens: int = 5  # for stall and drop: tokens sent before the stream breaks
    stall_s: float = 2.0  # for stall and timeout: how long the client waits before giving up

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"simulated fault kind must be one of {', '.join(FAULT_KINDS)}")

    def hits(self, request: GenerationRequest) -> bool:
        if request.attempt <= self.first_attempts:
            return True
        if self.rate <= 0:
            return False
        draw = int.from_bytes(hashlib.sha256(request.request_id.encode()).digest()[:4], "big")
        return draw / 2**32 < self.rate


def tokens_for(prompt: str, max_tokens: int) -> list[str]:
    """The whole answer for this prompt: same prompt, same words."""
    seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big")
    rng = random.Random(seed)
    # An answer spends between half and all of its token budget.
    half = max(1, max_tokens // 2)
    count = half + seed % (max_tokens - half + 1)
    words = [rng.choice(_WORDS) for _ in range(count)]
    words[0] = words[0].capitalize()
    return [word if i == 0 else " " + word for i, word in enumerate(words)]


def prompt_tokens(prompt: str) -> int:
    # The simulated engine's tokens are words; a prompt's word count stands in for its tokens.
    return len(prompt.split())


@dataclass
class _Request:
    request: GenerationRequest
    tokens: list[str]
    first_token_at: float  # loop time
    stream: "asyncio.Queue[TokenDelta | Finished | EngineUnavailable]"
    produced: int = 0
    break_after: int | None = None  # a stall or drop fault: stop producing here
    fault: str = ""


@dataclass
class SimulatedEngine(Engine):
    ttft_s: float
    tokens_per_s: float
    batch_capacity: int = 64
    faults: Faults = field(default_factory=Faults)
    name = "simulated"

    def __post_init__(self) -> None:
        self._active: dict[str, _Request] = {}
        self._wake: asyncio.Event | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self.decode_steps = 0

    @classmethod
    def from_settings(cls, **params: Any) -> "SimulatedEngine":
        """Settings give the defaults; a registry entry's params may scale or replace them."""
        tokens_per_s = params.get("tokens_per_s", settings.SLUICE_SIM_TOKENS_PER_S)
        faults = dict(params.get("faults", {}))
        if settings.SLUICE_SIM_FAIL_FIRST_ATTEMPTS and "first_attempts" not in faults:
            faults["first_attempts"] = settings.SLUICE_SIM_FAIL_FIRST_ATTEMPTS
        return cls(
            ttft_s=params.get("ttft_ms", settings.SLUICE_SIM_TTFT_MS) / 1000,
            tokens_per_s=tokens_per_s * params.get("tokens_per_s_factor", 1.0),
            batch_capacity=params.get("batch_capacity", settings.SLUICE_SIM_BATCH_CAPACITY),
            faults=Faults(**faults),
        )

    @property
    def active_requests(self) -> int:
        return len(self._active)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenDelta | Finished]:
        fault = self.faults.kind if self.faults.hits(request) else ""
        if fault in ("unavailable", "rate_limited"):
            retry_after = 1.0 if fault == "rate_limited" else None
            status = 429 if fault == "rate_limited" else 503
            raise EngineUnavailable(
                f"simulated engine: injected {status} on attempt {request.attempt}",
                retry_after_s=retry_after,
                throttled=fault == "rate_limited",
            )
        loop = asyncio.get_running_loop()
        state = _Request(
            request=request,
            tokens=tokens_for(request.prompt, request.max_tokens),
            first_token_at=loop.time() + self.ttft_s,
            stream=asyncio.Queue(),
            fault=fault,
            break_after=0 if fault == "timeout" else self.faults.after_tokens if fault else None,
        )
        self._active[request.request_id] = state
        self._ensure_decode_loop()
        try:
            while True:
                try:
                    item = await asyncio.wait_for(state.stream.get(), self._patience(state))
                except TimeoutError:
                    raise EngineUnavailable(
                        f"simulated engine: stream {_STALL_WORDS.get(state.fault, 'stalled')} after"
                        f" {state.produced} tokens (no token for {self.faults.stall_s}s)"
                    ) from None
                if isinstance(item, EngineUnavailable):
                    raise item
                yield item
                if isinstance(item, Finished):
                    return
        finally:
            # The consumer is gone or done. Its request stays in the batch only if it was
            # never aborted: that is the zombie the platform exists to prevent.
            if state.fault:
                self._active.pop(request.request_id, None)

    def _patience(self, state: _Request) -> float | None:
        """How long a client waits for the next token before calling the stream stalled:
        only faulted requests can stall; healthy ones wait as long as the batch needs."""
        return self.faults.stall_s + self.ttft_s if state.fault in ("stall", "timeout") else None

    async def abort(self, request_id: str) -> None:
        state = self._active.pop(request_id, None)
        if state is not None:
            state.stream.put_nowait(self._finished(state, "aborted"))

    async def close(self) -> None:
        for request_id in list(self._active):
            await self.abort(request_id)
        if self._loop_task is not None:
            self._loop_task.cancel()

    def _finished(self, state: _Request, reason: str) -> Finished:
        return Finished(
            reason=reason,  # type: ignore[arg-type]
            prompt_tokens=prompt_tokens(state.request.prompt),
            completion_tokens=state.produced,
            at=time.time(),
        )

    def _ensure_decode_loop(self) -> None:
        if self._wake is None:
            self._wake = asyncio.Event()
        self._wake.set()
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._decode_loop())

    async def _decode_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wake is not None
        next_step = loop.time()
        while True:
            if not self._active:
                self._wake.clear()
                await self._wake.wait()
                next_step = loop.time()
            decoding = [s for s in self._active.values() if s.first_token_at <= next_step]
            # Past capacity a decode step takes longer in proportion to the batch.
            slowdown = max(1.0, len(decoding) / self.batch_capacity)
            next_step += slowdown / self.tokens_per_s
            delay = next_step - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                next_step = loop.time()  # fell behind (a busy machine): do not burst
            self.decode_steps += 1
            self._decode_step(loop.time())

    def _decode_step(self, now: float) -> None:
        wall = time.time()
        for request_id, state in list(self._active.items()):
            if state.first_token_at > now:
                continue
            if state.break_after is not None and state.produced >= state.break_after:
                if state.fault == "drop":
                    self._active.pop(request_id, None)
                    state.stream.put_nowait(
                        EngineUnavailable(
                            f"simulated engine: stream dropped after {state.produced} tokens"
                        )
                    )
                continue  # a stall (or timeout) produces nothing; the client gives up
            state.stream.put_nowait(TokenDelta(state.tokens[state.produced], 1, wall))
            state.produced += 1
            if state.produced == len(state.tokens):
                self._active.pop(request_id, None)
                reason = "length" if len(state.tokens) == state.request.max_tokens else "stop"
                state.stream.put_nowait(self._finished(state, reason))
