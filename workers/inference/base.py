"""The one small interface every inference engine implements (DESIGN "Inference").

An engine streams a request's tokens as they are produced, aborts a request by id, and
ends every stream with exactly one `Finished` carrying the usage. Engines are asyncio
objects: they live on the event loop of their process's `EngineHost` (workers/inference/
host.py), which is what lets one engine instance serve many concurrent steps (continuous
batching on a GPU, many open streams to a provider). Engines never touch the database.
"""

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str  # unique per attempt; what abort() names
    prompt: str
    max_tokens: int
    temperature: float = 0.0
    # The step's attempt number: the simulated engine's injected faults key on it.
    attempt: int = 1
    # Engine-specific sampling parameters from the model registry (e.g. top_p).
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TokenDelta:
    text: str
    tokens: int  # tokens in this delta, usually 1
    at: float  # time.time() when the engine produced (or the client received) it


FinishReason = Literal["stop", "length", "aborted"]


@dataclass(frozen=True)
class Finished:
    """The last item of every stream. For an aborted request, `at` is when the engine
    stopped generating it (the abort took effect), which is what stop latency measures."""

    reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    at: float


class EngineError(Exception):
    """Generation failed. Transient failures are retried by the step's retry policy."""

    transient: ClassVar[bool] = True


class EngineUnavailable(EngineError):
    """Overloaded, rate limited (429), 5xx, timed out, stalled or dropped mid-stream:
    worth retrying. `retry_after_s` carries a provider's Retry-After when it sent one;
    `throttled` says the provider refused for load (429), which flow control treats as a
    signal to slow down rather than as the provider failing."""

    def __init__(
        self, message: str, *, retry_after_s: float | None = None, throttled: bool = False
    ) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.throttled = throttled


class EngineRejected(EngineError):
    """The engine refused the request itself (bad parameters, prompt too long, auth):
    retrying the same request cannot help."""

    transient = False


class Engine(ABC):
    """Implementations must be safe for many concurrent `generate` calls on one loop."""

    name: ClassVar[str]

    @abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenDelta | Finished]:
        """Yield token deltas as they are produced, then exactly one `Finished`.

        After `abort(request.request_id)` the stream yields no new tokens from the engine
        and ends with `Finished(reason="aborted")` promptly (within one decode step or
        network read). Raises EngineError subclasses; never yields after Finished."""

    @abstractmethod
    async def abort(self, request_id: str) -> None:
        """Stop generating `request_id` now; unknown or finished ids are ignored."""

    async def close(self) -> None:  # noqa: B027 (optional to override, hence not abstract)
        """Release what the engine holds (connections, GPU memory). Default: nothing."""
