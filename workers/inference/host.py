"""Where a worker process's engines live: one asyncio loop in a daemon thread, one engine
instance per model, shared by every step the process runs. Celery's worker threads drive
generations through `Generation`, a blocking iterator fed from the loop, so many steps share
one engine (continuous batching) while the operator code stays synchronous.

Every running generation is registered here by step, run and tenant, so a stop signal from
any source (the control channel, a deadline timer, the budget meter, the database poll)
finds and aborts it. The first signal wins; its timestamp is what stop latency and wasted
tokens are measured from.
"""

import asyncio
import queue
import threading
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field

from workers.inference.base import (
    Engine,
    EngineError,
    EngineUnavailable,
    Finished,
    GenerationRequest,
    TokenDelta,
)
from workers.inference.registry import ModelSpec, build_engine

# How long a Celery thread waits for its engine's next item before declaring the engine
# hung. Engines have their own stall detection; this is the backstop that frees the thread.
ENGINE_SILENCE_LIMIT_S = 300.0


@dataclass(frozen=True)
class StopSignal:
    kind: str  # cancelled | deadline | step_deadline | budget | lease_lost | ...
    at: float  # time.time() of the decision to stop (not of its arrival here)
    detail: str = ""


@dataclass
class Owner:
    """What a generation belongs to, for matching stop signals."""

    step_id: str
    run_id: str
    tenant_id: int


@dataclass
class Generation:
    """One request's stream as the Celery thread sees it."""

    request: GenerationRequest
    owner: Owner
    host: "EngineHost"
    model: str
    items: "queue.SimpleQueue[TokenDelta | Finished | BaseException]" = field(
        default_factory=queue.SimpleQueue
    )
    stop_signal: StopSignal | None = None
    finished: Finished | None = None
    # (time produced, tokens) of every delta, to count what came after the stop signal.
    produced: list[tuple[float, int]] = field(default_factory=list)
    deadline_timer: asyncio.TimerHandle | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __iter__(self) -> Iterator[TokenDelta]:
        try:
            while True:
                try:
                    item = self.items.get(timeout=ENGINE_SILENCE_LIMIT_S)
                except queue.Empty:
                    raise EngineUnavailable(
                        f"engine for {self.model} sent nothing for {ENGINE_SILENCE_LIMIT_S:.0f}s"
                    ) from None
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, Finished):
                    self.finished = item
                    return
                self.produced.append((item.at, item.tokens))
                yield item
        finally:
            self.host.forget(self)
            self.host.cancel_deadline(self)
            if self.finished is None:
                # The consumer left early (an error, a stop it noticed itself): never leave
                # the engine generating for nobody.
                self.stop(StopSignal("abandoned", time.time()))

    def stop(self, signal: StopSignal) -> bool:
        """Abort this generation in the engine. Thread-safe; the first signal is kept.
        False when it already had one."""
        with self._lock:
            if self.stop_signal is not None or self.finished is not None:
                return False
            self.stop_signal = signal
        self.host.abort(self.model, self.request.request_id)
        return True

    @property
    def completion_tokens(self) -> int:
        return sum(tokens for _, tokens in self.produced)

    @property
    def wasted_tokens(self) -> int:
        """Tokens the engine produced after the stop signal's timestamp: nobody reads them."""
        if self.stop_signal is None:
            return 0
        return sum(tokens for at, tokens in self.produced if at > self.stop_signal.at)

    @property
    def stop_latency_ms(self) -> float | None:
        """From the stop signal to the engine no longer generating; None without a stop, or
        when generation had ended before the signal was given."""
        if self.stop_signal is None or self.finished is None:
            return None
        if self.finished.reason != "aborted" and self.finished.at <= self.stop_signal.at:
            return None
        return max(0.0, (self.finished.at - self.stop_signal.at) * 1000)


class EngineHost:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._engines: dict[str, Engine] = {}
        self._running: dict[str, Generation] = {}  # by request id

    # --- the loop ---------------------------------------------------------------------

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(
                    target=loop.run_forever, name="sluice-engines", daemon=True
                )
                thread.start()
                self._loop = loop
            return self._loop

    def engine(self, spec: ModelSpec) -> Engine:
        with self._lock:
            engine = self._engines.get(spec.name)
            if engine is None:
                engine = self._engines[spec.name] = build_engine(spec)
            return engine

    # --- generations ------------------------------------------------------------------

    def start(
        self,
        spec: ModelSpec,
        request: GenerationRequest,
        owner: Owner,
        *,
        deadline: tuple[float, str] | None = None,
    ) -> Generation:
        """Begin generating. With `deadline` (time.time(), kind), the loop aborts the
        request at that moment itself: a deadline needs no message to arrive."""
        engine = self.engine(spec)
        generation = Generation(request=request, owner=owner, host=self, model=spec.name)
        with self._lock:
            self._running[request.request_id] = generation
        loop = self.loop
        asyncio.run_coroutine_threadsafe(self._pump(engine, generation), loop)
        if deadline is not None:
            at, kind = deadline
            loop.call_soon_threadsafe(self._arm_deadline, generation, at, kind)
        return generation

    def _arm_deadline(self, generation: Generation, at: float, kind: str) -> None:
        if generation.finished is not None or generation.stop_signal is not None:
            return
        delay = max(0.0, at - time.time())
        assert self._loop is not None
        generation.deadline_timer = self._loop.call_later(
            delay, lambda: generation.stop(StopSignal(kind, at))
        )

    def cancel_deadline(self, generation: Generation) -> None:
        """An ended generation's timer must not keep it (and its tokens) alive until the
        deadline, nor mark it stopped afterwards."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(_cancel_timer, generation)

    async def _pump(self, engine: Engine, generation: Generation) -> None:
        """Moves the engine's stream into the generation's queue, on the loop."""
        try:
            async for item in engine.generate(generation.request):
                generation.items.put(item)
        except EngineError as exc:
            generation.items.put(exc)
        except Exception as exc:  # an engine bug must reach the step, not die on the loop
            generation.items.put(EngineUnavailable(f"{type(exc).__name__}: {exc}"))

    def abort(self, model: str, request_id: str) -> None:
        engine = self._engines.get(model)
        if engine is not None and self._loop is not None:
            asyncio.run_coroutine_threadsafe(engine.abort(request_id), self._loop)

    def forget(self, generation: Generation) -> None:
        with self._lock:
            self._running.pop(generation.request.request_id, None)

    def stop_matching(
        self,
        signal: StopSignal,
        *,
        runs: Collection[str] = (),
        steps: Collection[str] = (),
        tenant: int | None = None,
    ) -> int:
        """Stops every running generation of these runs, steps or tenant; returns how many."""
        with self._lock:
            matching = [
                g
                for g in self._running.values()
                if g.owner.run_id in runs or g.owner.step_id in steps or g.owner.tenant_id == tenant
            ]
        return sum(g.stop(signal) for g in matching)

    def running(self) -> list[Generation]:
        with self._lock:
            return list(self._running.values())


def _cancel_timer(generation: Generation) -> None:
    if generation.deadline_timer is not None:
        generation.deadline_timer.cancel()
        generation.deadline_timer = None


# One per process: the engines and the registry of what they are generating.
HOST = EngineHost()
