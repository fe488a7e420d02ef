"""A small-model engine on plain torch + transformers, for CPU boxes and GPUs without vLLM.

`model.generate()` is blocking, so it runs on one worker thread. That thread is the whole
capacity of this engine: requests run one at a time, in order (HF generate does not batch
separate calls, and two generate() calls on one model in parallel would only contend).
Tokens come back to the event loop through an asyncio queue; abort sets the request's
threading.Event, which a StoppingCriteria reads after every token, so generation stops
within one decode step. torch and transformers are imported lazily (requirements-gpu.txt).
"""

import asyncio
import functools
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Final

from workers.inference.base import (
    Engine,
    EngineRejected,
    EngineUnavailable,
    Finished,
    FinishReason,
    GenerationRequest,
    TokenDelta,
)

INSTALL_HINT: Final = (
    "torch and transformers are not installed in this environment: run "
    "`pip install -r requirements-gpu.txt`"
)

# What the worker thread sends to the loop: ("prompt", n) | ("delta", text, n, at) |
# ("error", exc) | ("done", stopped_at, generated_tokens).
_Msg = tuple[Any, ...]
Emit = Callable[[_Msg], None]


@dataclass
class _Run:
    queue: asyncio.Queue[_Msg] = field(default_factory=asyncio.Queue)
    abort: threading.Event = field(default_factory=threading.Event)
    job: "Future[None] | None" = None


class TransformersEngine(Engine):
    """`model_obj` and `tokenizer` are for tests; by default both load from `model` (a hub
    name or a local path) on first use."""

    name = "transformers"

    def __init__(
        self,
        *,
        model: str,
        device: str = "cpu",
        model_obj: Any | None = None,
        tokenizer: Any | None = None,
    ) -> None:
        self.model = model
        self.device = device
        self._model = model_obj
        self._tokenizer = tokenizer
        self._load_lock = asyncio.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf-generate")
        self._runs: dict[str, _Run] = {}

    async def _loaded(self) -> tuple[Any, Any]:
        async with self._load_lock:
            if self._model is None or self._tokenizer is None:
                loop = asyncio.get_running_loop()
                self._model, self._tokenizer = await loop.run_in_executor(
                    self._executor, _load, self.model, self.device
                )
        return self._model, self._tokenizer

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenDelta | Finished]:
        rid = request.request_id
        model, tokenizer = await self._loaded()
        if rid in self._runs:
            raise EngineRejected(f"request id {rid!r} is already generating")
        run = self._runs[rid] = _Run()
        loop = asyncio.get_running_loop()

        def emit(msg: _Msg) -> None:
            try:
                loop.call_soon_threadsafe(run.queue.put_nowait, msg)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                run.abort.set()

        job = run.job = self._executor.submit(
            _generate_blocking, model, tokenizer, self.device, request, run.abort, emit
        )
        prompt_tokens = completion_tokens = 0
        try:
            while True:
                kind, *rest = await run.queue.get()
                if kind == "prompt":
                    prompt_tokens = rest[0]
                elif kind == "delta" and not run.abort.is_set():
                    completion_tokens += rest[1]
                    yield TokenDelta(*rest)
                elif kind == "error" and not run.abort.is_set():
                    raise _engine_error(rest[0]) from rest[0]
                elif kind in ("done", "error"):
                    stopped_at = rest[0] if kind == "done" else time.time()
                    generated = rest[1] if kind == "done" else completion_tokens
                    reason = _reason(run.abort.is_set(), generated, request.max_tokens)
                    yield Finished(reason, prompt_tokens, completion_tokens, stopped_at)
                    return
        finally:
            self._runs.pop(rid, None)
            run.abort.set()  # a consumer that went away stops its generation too
            job.cancel()

    async def abort(self, request_id: str) -> None:
        run = self._runs.get(request_id)
        if run is None or run.abort.is_set():
            return
        run.abort.set()
        if run.job is not None and run.job.cancel():
            # Still queued behind another request: it will never start.
            run.queue.put_nowait(("done", time.time(), 0))

    async def close(self) -> None:
        for run in self._runs.values():
            run.abort.set()
        self._executor.shutdown(wait=False, cancel_futures=True)


def _reason(aborted: bool, generated: int, max_tokens: int) -> FinishReason:
    if aborted:
        return "aborted"
    return "length" if generated >= max_tokens else "stop"


def _engine_error(exc: Exception) -> Exception:
    if isinstance(exc, ValueError | TypeError):
        return EngineRejected(f"transformers rejected the request: {exc}")
    # CUDA out of memory and the like: another attempt may find room.
    return EngineUnavailable(f"transformers generation failed: {type(exc).__name__}: {exc}")


def _load(model: str, device: str) -> tuple[Any, Any]:
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise EngineRejected(INSTALL_HINT) from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(model)
        loaded = AutoModelForCausalLM.from_pretrained(model)
    except (OSError, ValueError) as exc:
        raise EngineRejected(f"transformers cannot load {model}: {exc}") from exc
    return loaded.to(device).eval(), tokenizer


def _generate_blocking(
    model: Any,
    tokenizer: Any,
    device: str,
    request: GenerationRequest,
    abort: threading.Event,
    emit: Emit,
) -> None:
    """Runs on the worker thread; reports everything through `emit`, never raises."""
    generated = 0
    try:
        if not abort.is_set():
            streamer_cls, criteria_cls, criteria_list = _hf_classes()
            inputs = tokenizer(request.prompt, return_tensors="pt").to(device)
            emit(("prompt", int(inputs["input_ids"].shape[-1])))
            streamer = streamer_cls(tokenizer, emit)
            options: dict[str, Any] = {"max_new_tokens": request.max_tokens, **request.extra}
            # Passing a temperature without sampling makes transformers warn.
            options["do_sample"] = request.temperature > 0
            if request.temperature > 0:
                options["temperature"] = request.temperature
            model.generate(
                **inputs,
                streamer=streamer,
                stopping_criteria=criteria_list([criteria_cls(abort)]),
                **options,
            )
            generated = streamer.generated
    except Exception as exc:
        emit(("error", exc))
        return
    emit(("done", time.time(), generated))


@functools.cache
def _hf_classes() -> tuple[type, type, type]:
    """The streamer and the abort criterion subclass transformers' bases, which can only be
    imported once transformers is known to be installed."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList
    from transformers.generation.streamers import BaseStreamer

    class AbortCriteria(StoppingCriteria):
        def __init__(self, abort: threading.Event) -> None:
            self.abort = abort

        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            stop = self.abort.is_set()
            return torch.full(
                (input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device
            )

    class LoopStreamer(BaseStreamer):
        """Like TextIteratorStreamer, but hands each token to the loop as soon as it exists."""

        def __init__(self, tokenizer: Any, emit: Emit) -> None:
            self.tokenizer = tokenizer
            self.emit = emit
            self.ids: list[int] = []
            self.sent = 0  # characters of the decoded text already emitted
            self.prompt_seen = False

        @property
        def generated(self) -> int:
            return len(self.ids)

        def put(self, value: Any) -> None:
            if not self.prompt_seen:  # generate() first puts the prompt's ids
                self.prompt_seen = True
                return
            new_ids = [int(i) for i in value.reshape(-1).tolist()]
            self.ids.extend(new_ids)
            text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
            # Hold back a partial multi-byte character until its next token completes it.
            new_text = "" if text.endswith("\ufffd") else text[self.sent :]
            self.sent += len(new_text)
            self.emit(("delta", new_text, len(new_ids), time.time()))

        def end(self) -> None:
            rest = self.tokenizer.decode(self.ids, skip_special_tokens=True)[self.sent :]
            if rest:
                self.sent += len(rest)
                self.emit(("delta", rest, 0, time.time()))

    return LoopStreamer, AbortCriteria, StoppingCriteriaList
