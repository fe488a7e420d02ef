"""A fake of the two vLLM V1 `AsyncLLM` methods the adapter uses (`generate`, `abort`), with
the output objects and errors they produce: vLLM cannot run here (no GPU, not installed)."""

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

EOS_ID = 2
STEP_S = 0.01


class EngineDeadError(Exception):
    """vllm.v1.engine.exceptions.EngineDeadError: the engine core died."""


class EngineGenerateError(Exception):
    """vllm.v1.engine.exceptions.EngineGenerateError: generate() failed unexpectedly."""


class VLLMValidationError(ValueError):
    """vllm.exceptions.VLLMValidationError: a bad request (a ValueError, as upstream)."""


@dataclass
class FakeSamplingParams:
    """vllm.SamplingParams: validates on construction (ValueError), unknown keys are a
    TypeError (it is a msgspec Struct)."""

    max_tokens: int
    temperature: float
    top_p: float = 1.0
    output_kind: Any = None

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}.")
        if self.temperature < 0:
            raise ValueError(f"temperature must be non-negative, got {self.temperature}.")


@dataclass
class FakeCompletion:
    """vllm.outputs.CompletionOutput, the fields the adapter reads."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None


@dataclass
class FakeOutput:
    """vllm.outputs.RequestOutput in DELTA mode: only this step's text and token ids."""

    request_id: str
    prompt: str
    prompt_token_ids: list[int]
    outputs: list[FakeCompletion]
    finished: bool

    def merge(self, later: "FakeOutput") -> None:
        """RequestOutput.add(aggregate=True): text and ids are appended, the later
        finish_reason wins."""
        self.finished |= later.finished
        mine, theirs = self.outputs[0], later.outputs[0]
        mine.text += theirs.text
        mine.token_ids.extend(theirs.token_ids)
        mine.finish_reason = theirs.finish_reason


class _StreamEnd:
    pass


STREAM_END = _StreamEnd()
Pending = FakeOutput | BaseException | _StreamEnd


class Collector:
    """RequestOutputCollector: one slot per request; a consumer that lags gets the outputs
    merged into one instead of a backlog; an exception put there is raised by get()."""

    def __init__(self) -> None:
        self.pending: Pending | None = None
        self.ready = asyncio.Event()

    def put(self, item: Pending) -> None:
        if isinstance(self.pending, FakeOutput) and isinstance(item, FakeOutput):
            self.pending.merge(item)
        else:
            self.pending = item
        self.ready.set()

    async def get(self) -> FakeOutput | _StreamEnd:
        while (item := self.pending) is None:
            await self.ready.wait()
        self.pending = None
        self.ready.clear()
        if isinstance(item, BaseException):
            raise item
        return item


@dataclass
class FakeRequest:
    request_id: str
    prompt: str
    max_tokens: int
    eos_after: int | None
    collector: Collector = field(default_factory=Collector)
    produced: int = 0

    @property
    def prompt_token_ids(self) -> list[int]:
        return list(range(len(self.prompt.split())))  # one token per word


AbortStyle = Literal["final_output", "silent", "end", "cancelled"]


class FakeAsyncLLM:
    """The two methods of vLLM V1's AsyncLLM the adapter uses, `generate` and `abort`,
    over a simulated engine core that decodes one token for every running request per
    step (continuous batching), a step every `step_s`.

    Imitated from vllm-project/vllm (read in this session):
    - vllm/v1/engine/async_llm.py `generate()`: registers the request, then yields what the
      output handler puts in the request's collector until an output has `finished`; on
      CancelledError/GeneratorExit (consumer gone) it aborts the request and re-raises;
      EngineDeadError and validation errors pass through, anything else becomes
      EngineGenerateError. `abort()` aborts in the OutputProcessor, then tells the core.
    - vllm/v1/engine/output_processor.py: RequestOutputCollector (one merged slot in
      DELTA mode); `abort_requests` drops the request's state and puts a final output with
      no new tokens and finish_reason "abort"; `process_outputs` ignores core outputs of a
      request whose state is gone ("Ignore output for already-aborted request");
      `propagate_error` puts the output handler's exception into every collector.
    - vllm/v1/engine/core.py `run_busy_loop`: the input queue (adds and aborts) is
      drained before each step, so an aborted request gets at most the step already in
      flight; vllm/v1/engine/__init__.py FINISH_REASON_STRINGS: stop, length, abort,
      error, repetition. The EOS token is an output token (counted; its text is skipped).
    `abort_style` replays how other releases ended a stream after abort: "silent" is early
    V1 (0.8.x OutputProcessor.abort_requests only popped the state, so generate() waited
    forever), "end" is a generator that simply returns, "cancelled" is V0's
    AsyncLLMEngine (abort_request(..., exception=asyncio.CancelledError)).
    `produced` counts the tokens the core generated per request, delivered or not.
    """

    def __init__(
        self,
        *,
        step_s: float = STEP_S,
        abort_style: AbortStyle = "final_output",
        eos_after: dict[str, int] | None = None,
        die_at_step: int | None = None,
        max_model_len: int = 64,
    ) -> None:
        self.step_s = step_s
        self.abort_style = abort_style
        self.eos_after = eos_after or {}
        self.die_at_step = die_at_step
        self.max_model_len = max_model_len
        self.produced: dict[str, int] = {}
        self.aborted: list[str] = []
        self.params: dict[str, Any] = {}
        self.steps = 0
        self.shut_down = False
        self._states: dict[str, FakeRequest] = {}  # the OutputProcessor's request states
        self._running: dict[str, FakeRequest] = {}  # the engine core's scheduled requests
        self._inbox: list[FakeRequest | str] = []  # the core's input queue: adds, abort ids
        self._core: asyncio.Task[None] | None = None

    async def generate(
        self, prompt: str, sampling_params: Any, request_id: str
    ) -> AsyncIterator[FakeOutput]:
        if len(prompt.split()) > self.max_model_len:
            raise VLLMValidationError(
                f"The decoder prompt (length {len(prompt.split())}) is longer than the "
                f"maximum model length of {self.max_model_len}."
            )
        if request_id in self._states:
            raise ValueError(f"Request id {request_id} already running.")
        self.params[request_id] = sampling_params
        request = FakeRequest(
            request_id, prompt, sampling_params.max_tokens, self.eos_after.get(prompt)
        )
        self._states[request_id] = request
        self._inbox.append(request)
        if self._core is None or self._core.done():
            self._core = asyncio.create_task(self._run_core())
        try:
            while True:
                output = await request.collector.get()
                if isinstance(output, _StreamEnd):
                    return
                yield output
                if output.finished:
                    return
        except (asyncio.CancelledError, GeneratorExit):
            await self.abort(request_id)
            raise
        except (EngineDeadError, ValueError):
            raise
        except Exception as exc:
            raise EngineGenerateError() from exc

    async def abort(self, request_id: str) -> None:
        request = self._states.pop(request_id, None)
        if request is not None:
            self.aborted.append(request_id)
            if self.abort_style == "final_output":
                request.collector.put(self._output(request, "", [], "abort"))
            elif self.abort_style == "end":
                request.collector.put(STREAM_END)
            elif self.abort_style == "cancelled":
                request.collector.put(asyncio.CancelledError())
        self._inbox.append(request_id)
        await asyncio.sleep(0)  # the message to the engine core process

    def shutdown(self) -> None:
        self.shut_down = True

    async def _run_core(self) -> None:
        while True:
            for item in self._inbox:
                if isinstance(item, FakeRequest):
                    self._running[item.request_id] = item
                else:
                    self._running.pop(item, None)
            self._inbox.clear()
            if not self._running:
                return  # idle; the next add starts the loop again
            await asyncio.sleep(self.step_s)  # one forward pass for the whole batch
            self.steps += 1
            if self.steps == self.die_at_step:  # the core process died in this step
                for request in self._states.values():
                    request.collector.put(EngineDeadError("EngineCore encountered an issue."))
                self._running.clear()
                return
            for request in list(self._running.values()):
                self._decode(request)

    def _decode(self, request: FakeRequest) -> None:
        request.produced += 1
        self.produced[request.request_id] = request.produced
        reason: str | None = None
        if request.eos_after is not None and request.produced > request.eos_after:
            token_id, text, reason = EOS_ID, "", "stop"
        else:
            token_id, text = 100 + request.produced, f" w{request.produced}"
            if request.produced >= request.max_tokens:
                reason = "length"
        if reason is not None:
            del self._running[request.request_id]
        if self._states.get(request.request_id) is not request:
            return  # aborted in the frontend: the core's output is dropped
        request.collector.put(self._output(request, text, [token_id], reason))
        if reason is not None:
            del self._states[request.request_id]

    @staticmethod
    def _output(request: FakeRequest, text: str, ids: list[int], reason: str | None) -> FakeOutput:
        completion = FakeCompletion(0, text, ids, reason)
        return FakeOutput(
            request.request_id, request.prompt, request.prompt_token_ids, [completion], bool(reason)
        )
