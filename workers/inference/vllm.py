"""The vLLM engine: one in-process V1 `AsyncLLM` per GPU worker process, serving many
concurrent requests so that vLLM's continuous batching does the work (DESIGN "Inference").

vLLM is imported lazily on first use, so this module imports on machines without a GPU.

How vLLM ends a request after `abort()` changed between releases, and the stream must end
with `Finished(aborted)` in every case:
- current V1: `AsyncLLM.abort` puts a last output with `finish_reason="abort"` into the
  request's queue (OutputProcessor.abort_requests, "Produce final abort output");
- early V1 (0.8.x): the request's state is dropped and `generate()` waits forever;
- V0's AsyncLLMEngine: the stream raises `asyncio.CancelledError` into the consumer.
So a per-request pump task reads vLLM's generator into a queue, and `abort()` wakes the
consumer itself instead of trusting vLLM to end the generator.
"""

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Final

from workers.inference.base import (
    Engine,
    EngineError,
    EngineRejected,
    EngineUnavailable,
    Finished,
    FinishReason,
    GenerationRequest,
    TokenDelta,
)

logger = logging.getLogger(__name__)

INSTALL_HINT: Final = (
    "vLLM is not installed in this environment: run `pip install -r requirements-gpu.txt` "
    "on a GPU node"
)
# Keys the adapter sets itself: one completion per request (it reads outputs[0]) and
# delta outputs (it counts each output's token_ids once).
RESERVED_PARAMS: Final = frozenset({"max_tokens", "temperature", "output_kind", "n"})
# vLLM's exceptions for a bad request; older releases raise a plain ValueError instead.
_CLIENT_ERRORS: Final = frozenset({"VLLMClientError", "VLLMValidationError"})


class _End:
    """Queued by the pump when vLLM's generator ended (or raised CancelledError)."""


_END: Final = _End()
_Item = Any  # a vLLM RequestOutput, an Exception from generate(), or _END


@dataclass
class _Stream:
    llm: Any  # the AsyncLLM serving it
    queue: asyncio.Queue[_Item] = field(default_factory=asyncio.Queue)
    abort_requested: bool = False
    abort_done: asyncio.Event = field(default_factory=asyncio.Event)
    aborted_at: float = 0.0


def default_sampling_params(**kwargs: Any) -> Any:
    """vLLM SamplingParams in DELTA mode: each output carries only the new tokens and text."""
    try:
        from vllm.sampling_params import RequestOutputKind, SamplingParams
    except ImportError as exc:
        raise EngineRejected(INSTALL_HINT) from exc
    return SamplingParams(output_kind=RequestOutputKind.DELTA, **kwargs)


class VLLMEngine(Engine):
    """`llm` (an AsyncLLM stand-in) and `sampling_params` (replaces `default_sampling_params`)
    are for tests; by default both come from vLLM on first use."""

    name = "vllm"

    def __init__(
        self,
        *,
        model: str,
        engine_args: dict[str, Any] | None = None,
        llm: Any | None = None,
        sampling_params: Callable[..., Any] | None = None,
    ) -> None:
        self.model = model
        self._engine_args = dict(engine_args or {})
        self._llm = llm
        self._sampling_params = sampling_params or default_sampling_params
        self._streams: dict[str, _Stream] = {}
        self._build_lock = asyncio.Lock()

    async def _engine(self) -> Any:
        async with self._build_lock:  # concurrent first requests share one build
            if self._llm is None:
                # Loading the model takes minutes: off the loop, which serves other streams.
                self._llm = await asyncio.to_thread(_build_async_llm, self.model, self._engine_args)
        return self._llm

    def _params(self, request: GenerationRequest) -> Any:
        reserved = RESERVED_PARAMS & request.extra.keys()
        if reserved:
            name = sorted(reserved)[0]
            raise EngineRejected(f"extra sampling parameter {name!r} is set by the engine itself")
        try:
            return self._sampling_params(
                max_tokens=request.max_tokens, temperature=request.temperature, **request.extra
            )
        except (ValueError, TypeError) as exc:
            raise EngineRejected(f"bad sampling parameters for vLLM: {exc}") from exc

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenDelta | Finished]:
        rid = request.request_id
        llm = await self._engine()
        params = self._params(request)
        if rid in self._streams:
            raise EngineRejected(f"request id {rid!r} is already generating")
        stream = self._streams[rid] = _Stream(llm)
        pump = asyncio.create_task(_pump(llm, request, params, stream), name=f"vllm-pump-{rid}")
        prompt_tokens = completion_tokens = 0
        try:
            while True:
                item = await stream.queue.get()
                if stream.abort_requested:
                    # Whatever vLLM sent after abort() (tokens, the abort output, an error,
                    # the end) is dropped: the caller asked to stop.
                    await stream.abort_done.wait()
                    yield Finished("aborted", prompt_tokens, completion_tokens, stream.aborted_at)
                    return
                if item is _END:
                    raise EngineUnavailable(f"vLLM ended request {rid} without a final output")
                if isinstance(item, BaseException):
                    raise _engine_error(item) from item
                prompt_ids = getattr(item, "prompt_token_ids", None)
                if prompt_ids is not None:
                    prompt_tokens = len(prompt_ids)
                completion = item.outputs[0]
                if completion.token_ids:
                    completion_tokens += len(completion.token_ids)
                    yield TokenDelta(completion.text, len(completion.token_ids), time.time())
                if item.finished:
                    reason = _finish_reason(rid, completion.finish_reason)
                    yield Finished(reason, prompt_tokens, completion_tokens, time.time())
                    return
        finally:
            self._streams.pop(rid, None)
            # Cancelling the pump raises CancelledError inside vLLM's generate(), which
            # aborts the request in vLLM: a consumer that goes away frees its GPU slot.
            pump.cancel()
            await asyncio.wait({pump})

    async def abort(self, request_id: str) -> None:
        stream = self._streams.get(request_id)
        if stream is None or stream.abort_requested:
            return
        stream.abort_requested = True
        try:
            # Returns once vLLM's frontend dropped the request and the engine core was told;
            # the core stops scheduling it before its next step.
            await stream.llm.abort(request_id)
        except Exception:
            # A dead engine generates nothing either: the stream still ends as aborted.
            logger.warning("vLLM abort of %s failed", request_id, exc_info=True)
        finally:
            stream.aborted_at = time.time()
            stream.abort_done.set()
            stream.queue.put_nowait(_END)  # wakes a consumer that vLLM leaves waiting

    async def close(self) -> None:
        shutdown = getattr(self._llm, "shutdown", None)
        if shutdown is not None:
            shutdown()


def _build_async_llm(model: str, engine_args: dict[str, Any]) -> Any:
    """Runs on a worker thread. AsyncLLM allows construction outside the event loop: its
    output handler (and the core client's output task) start on the first request, on the
    loop that makes it."""
    try:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM
    except ImportError as exc:
        raise EngineRejected(INSTALL_HINT) from exc
    try:
        return AsyncLLM.from_engine_args(AsyncEngineArgs(model=model, **engine_args))
    except (ValueError, TypeError) as exc:
        raise EngineRejected(f"vLLM refused engine arguments for {model}: {exc}") from exc
    except Exception as exc:
        raise EngineUnavailable(f"vLLM could not start {model}: {exc}") from exc


async def _pump(llm: Any, request: GenerationRequest, params: Any, stream: _Stream) -> None:
    """Moves vLLM's outputs for one request into its stream's queue; never raises except
    for its own cancellation."""
    outputs = llm.generate(request.prompt, params, request_id=request.request_id)
    try:
        async with contextlib.aclosing(outputs):
            async for output in outputs:
                stream.queue.put_nowait(output)
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
        # Not our cancellation: the engine ended the stream this way (V0's abort did).
    except Exception as exc:
        stream.queue.put_nowait(exc)
        return
    stream.queue.put_nowait(_END)


def _finish_reason(request_id: str, vllm_reason: str | None) -> FinishReason:
    if vllm_reason == "error":
        # V1's FinishReason.ERROR: "retryable request-level internal error".
        raise EngineUnavailable(f"vLLM failed request {request_id} (finish_reason=error)")
    if vllm_reason == "abort":
        # Aborted without our abort() (e.g. pause_generation(mode="abort") for a weight
        # update): the work was not finished and is worth retrying.
        raise EngineUnavailable(f"vLLM aborted request {request_id} on its own")
    # The rest of vllm/v1/engine FINISH_REASON_STRINGS: stop, repetition (the model was
    # cut off for repeating itself) and whatever later releases add all end the answer.
    return "length" if vllm_reason == "length" else "stop"


def _engine_error(exc: BaseException) -> EngineError:
    if isinstance(exc, EngineError):
        return exc
    names = {cls.__name__ for cls in type(exc).__mro__}
    if isinstance(exc, ValueError) or names & _CLIENT_ERRORS:
        return EngineRejected(f"vLLM rejected the request: {exc}")
    # EngineDeadError, EngineGenerateError and anything unexpected: worth a retry.
    return EngineUnavailable(f"vLLM failed: {type(exc).__name__}: {exc}")
