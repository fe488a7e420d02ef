"""The vLLM adapter against a fake AsyncLLM that behaves like vLLM V1; the transformers
engine against a tiny random GPT-2 where torch and transformers are installed (GPU nodes).

No database: plain functions that run their own event loop."""

import asyncio
import enum
import sys
import time
import types
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import pytest

from workers.inference.base import (
    EngineRejected,
    EngineUnavailable,
    Finished,
    GenerationRequest,
    TokenDelta,
)
from workers.inference.transformers_engine import TransformersEngine
from workers.inference.vllm import VLLMEngine

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


def vllm_engine(llm: FakeAsyncLLM) -> VLLMEngine:
    return VLLMEngine(model="fake/model", llm=llm, sampling_params=FakeSamplingParams)


def request(
    rid: str = "r1", prompt: str = "tell me a story", max_tokens: int = 5, **kwargs: Any
) -> GenerationRequest:
    return GenerationRequest(request_id=rid, prompt=prompt, max_tokens=max_tokens, **kwargs)


async def collect(engine: Any, req: GenerationRequest) -> list[TokenDelta | Finished]:
    return [item async for item in engine.generate(req)]


def split(items: list[TokenDelta | Finished]) -> tuple[list[TokenDelta], Finished]:
    *deltas, last = items
    assert all(isinstance(d, TokenDelta) for d in deltas)
    assert isinstance(last, Finished)
    return cast(list[TokenDelta], deltas), last


def test_full_stream_reports_text_tokens_and_length() -> None:
    llm = FakeAsyncLLM()
    deltas, finished = split(asyncio.run(collect(vllm_engine(llm), request(max_tokens=5))))

    assert "".join(d.text for d in deltas) == " w1 w2 w3 w4 w5"
    assert [d.tokens for d in deltas] == [1, 1, 1, 1, 1]
    assert [d.at for d in deltas] == sorted(d.at for d in deltas)
    assert deltas[-1].at <= finished.at
    assert (finished.reason, finished.prompt_tokens, finished.completion_tokens) == ("length", 4, 5)
    assert llm.produced == {"r1": 5}


def test_eos_ends_the_stream_with_stop_and_counts_the_eos_token() -> None:
    llm = FakeAsyncLLM(eos_after={"say three words": 3})
    req = request(prompt="say three words", max_tokens=10)
    deltas, finished = split(asyncio.run(collect(vllm_engine(llm), req)))

    assert [(d.text, d.tokens) for d in deltas] == [(" w1", 1), (" w2", 1), (" w3", 1), ("", 1)]
    assert (finished.reason, finished.prompt_tokens, finished.completion_tokens) == ("stop", 3, 4)


@pytest.mark.parametrize("style", ["final_output", "silent", "end", "cancelled"])
def test_abort_mid_stream_ends_aborted_and_the_engine_stops(style: AbortStyle) -> None:
    llm = FakeAsyncLLM(abort_style=style)
    engine = vllm_engine(llm)

    async def scenario() -> dict[str, Any]:
        seen: list[TokenDelta | Finished] = []
        third = asyncio.Event()

        async def consume() -> None:
            async for item in engine.generate(request(max_tokens=1000)):
                seen.append(item)
                if len(seen) == 3:
                    third.set()

        consumer = asyncio.create_task(consume())
        await third.wait()
        before = time.time()
        await engine.abort("r1")
        after = time.time()
        delivered_by_then = len(seen)
        produced_at_abort = llm.produced["r1"]
        await asyncio.wait_for(consumer, timeout=5)
        await asyncio.sleep(STEP_S * 5)
        produced_later = llm.produced["r1"]
        await asyncio.sleep(STEP_S * 5)
        return {
            "seen": seen,
            "window": (before, after),
            "delivered_by_then": delivered_by_then,
            "produced": (produced_at_abort, produced_later, llm.produced["r1"]),
        }

    result = asyncio.run(scenario())
    deltas, finished = split(result["seen"])
    assert finished.reason == "aborted"
    assert len(deltas) == result["delivered_by_then"] >= 3  # nothing after abort() returned
    assert (finished.completion_tokens, finished.prompt_tokens) == (len(deltas), 4)
    before, after = result["window"]
    assert before <= finished.at <= after
    at_abort, later, latest = result["produced"]
    assert at_abort <= later <= at_abort + 1  # the step in flight, then nothing
    assert later == latest
    assert llm.aborted == ["r1"]


def test_aborting_one_of_several_concurrent_requests_leaves_the_others_running() -> None:
    llm = FakeAsyncLLM()
    engine = vllm_engine(llm)

    async def scenario() -> dict[str, list[TokenDelta | Finished]]:
        results: dict[str, list[TokenDelta | Finished]] = {"a": [], "b": [], "c": []}
        b_started = asyncio.Event()

        async def consume(rid: str) -> None:
            async for item in engine.generate(request(rid, max_tokens=20)):
                results[rid].append(item)
                if rid == "b" and len(results[rid]) == 2:
                    b_started.set()

        tasks = [asyncio.create_task(consume(rid)) for rid in results]
        await b_started.wait()
        await engine.abort("b")
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=5)
        return results

    results = asyncio.run(scenario())
    for rid in ("a", "c"):
        deltas, finished = split(results[rid])
        assert (finished.reason, finished.completion_tokens, len(deltas)) == ("length", 20, 20)
        assert llm.produced[rid] == 20
    deltas, finished = split(results["b"])
    assert (finished.reason, finished.completion_tokens, len(deltas)) == ("aborted", 2, 2)
    assert llm.produced["b"] <= 3
    assert llm.aborted == ["b"]
    assert llm.steps < 40  # the three shared decode steps: batched, not one after another


def test_sampling_params_carry_max_tokens_temperature_and_extra() -> None:
    made: list[dict[str, Any]] = []

    def params(**kwargs: Any) -> FakeSamplingParams:
        made.append(kwargs)
        return FakeSamplingParams(**kwargs)

    llm = FakeAsyncLLM()
    engine = VLLMEngine(model="fake/model", llm=llm, sampling_params=params)
    req = request(max_tokens=3, temperature=0.7, extra={"top_p": 0.9})
    asyncio.run(collect(engine, req))

    assert made == [{"max_tokens": 3, "temperature": 0.7, "top_p": 0.9}]
    assert llm.params["r1"] == FakeSamplingParams(max_tokens=3, temperature=0.7, top_p=0.9)


def test_first_use_builds_async_llm_from_engine_args_with_delta_params(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The lazy path against stand-ins for the vLLM modules the adapter imports."""
    built: dict[str, Any] = {}
    llm = FakeAsyncLLM()

    class RequestOutputKind(enum.Enum):
        CUMULATIVE = 0
        DELTA = 1
        FINAL_ONLY = 2

    class AsyncEngineArgs:
        def __init__(self, **kwargs: Any) -> None:
            built["engine_args"] = kwargs

    class AsyncLLM:
        @classmethod
        def from_engine_args(cls, engine_args: AsyncEngineArgs) -> FakeAsyncLLM:
            built["from_engine_args"] = engine_args
            return llm

    modules: dict[str, dict[str, Any]] = {
        "vllm": {},
        "vllm.engine": {},
        "vllm.engine.arg_utils": {"AsyncEngineArgs": AsyncEngineArgs},
        "vllm.sampling_params": {
            "SamplingParams": FakeSamplingParams,
            "RequestOutputKind": RequestOutputKind,
        },
        "vllm.v1": {},
        "vllm.v1.engine": {},
        "vllm.v1.engine.async_llm": {"AsyncLLM": AsyncLLM},
    }
    for name, attrs in modules.items():
        monkeypatch.setitem(sys.modules, name, types.SimpleNamespace(**attrs))

    engine = VLLMEngine(model="org/tiny", engine_args={"gpu_memory_utilization": 0.8})
    req = request(max_tokens=3, temperature=0.5, extra={"top_p": 0.95})
    _, finished = split(asyncio.run(collect(engine, req)))
    asyncio.run(engine.close())

    assert built["engine_args"] == {"model": "org/tiny", "gpu_memory_utilization": 0.8}
    assert llm.params["r1"] == FakeSamplingParams(
        max_tokens=3, temperature=0.5, top_p=0.95, output_kind=RequestOutputKind.DELTA
    )
    assert finished.reason == "length"
    assert llm.shut_down


def test_missing_vllm_is_rejected_with_the_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)
    engine = VLLMEngine(model="org/tiny")
    with pytest.raises(EngineRejected, match=r"pip install -r requirements-gpu\.txt"):
        asyncio.run(collect(engine, request()))


def test_engine_death_mid_stream_is_unavailable() -> None:
    llm = FakeAsyncLLM(die_at_step=4)

    async def scenario() -> list[TokenDelta | Finished]:
        seen: list[TokenDelta | Finished] = []
        with pytest.raises(EngineUnavailable, match="EngineDeadError") as raised:
            async for item in vllm_engine(llm).generate(request(max_tokens=10)):
                seen.append(item)
        assert raised.value.transient
        return seen

    assert len(asyncio.run(scenario())) == 3


@pytest.mark.parametrize(
    ("req", "message"),
    [
        (request(temperature=-1.0), "temperature must be non-negative"),
        (request(extra={"nucleus": 0.9}), "unexpected keyword argument 'nucleus'"),
        (request(extra={"n": 2}), "'n' is set by the engine"),
        (request(prompt="word " * 100), "longer than the maximum model length"),
    ],
)
def test_bad_requests_are_rejected_not_retried(req: GenerationRequest, message: str) -> None:
    llm = FakeAsyncLLM()
    with pytest.raises(EngineRejected, match=message) as raised:
        asyncio.run(collect(vllm_engine(llm), req))
    assert not raised.value.transient
    assert llm.produced == {}


class ScriptedLLM:
    """Replays fixed outputs for any request: for endings FakeAsyncLLM never produces."""

    def __init__(self, *outputs: FakeOutput) -> None:
        self.outputs = outputs

    async def generate(
        self, prompt: str, sampling_params: Any, request_id: str
    ) -> AsyncIterator[FakeOutput]:
        for output in self.outputs:
            yield output

    async def abort(self, request_id: str) -> None:
        pass


def scripted(text: str, reason: str | None) -> FakeOutput:
    return FakeOutput("r1", "p", [0], [FakeCompletion(0, text, [7], reason)], bool(reason))


@pytest.mark.parametrize(
    ("outputs", "message"),
    [
        # FinishReason.ERROR: V1's "retryable request-level internal error".
        ([scripted(" a", None), scripted("", "error")], "finish_reason=error"),
        # Aborted by vLLM itself (e.g. pause_generation(mode="abort")), not by abort().
        ([scripted(" a", None), scripted("", "abort")], "aborted request r1 on its own"),
        ([scripted(" a", None)], "without a final output"),
    ],
)
def test_endings_nobody_asked_for_are_unavailable(outputs: list[FakeOutput], message: str) -> None:
    engine = VLLMEngine(model="fake/model", llm=ScriptedLLM(*outputs), sampling_params=dict)
    with pytest.raises(EngineUnavailable, match=message):
        asyncio.run(collect(engine, request()))


def test_repetition_and_unknown_finish_reasons_end_as_stop() -> None:
    llm = ScriptedLLM(scripted(" a", None), scripted(" b", "repetition"))
    engine = VLLMEngine(model="fake/model", llm=llm, sampling_params=dict)
    deltas, finished = split(asyncio.run(collect(engine, request())))
    assert [d.text for d in deltas] == [" a", " b"]
    assert (finished.reason, finished.prompt_tokens, finished.completion_tokens) == ("stop", 1, 2)


def test_a_consumer_that_goes_away_aborts_its_request_in_vllm() -> None:
    llm = FakeAsyncLLM()

    async def scenario() -> tuple[int, int]:
        stream = cast(
            AsyncGenerator[Any, None], vllm_engine(llm).generate(request(max_tokens=1000))
        )
        assert isinstance(await anext(stream), TokenDelta)
        await stream.aclose()
        produced = llm.produced["r1"]
        await asyncio.sleep(STEP_S * 5)
        return produced, llm.produced["r1"]

    at_close, later = asyncio.run(scenario())
    assert llm.aborted == ["r1"]
    assert later <= at_close + 1


def test_unknown_and_finished_ids_are_ignored_by_abort() -> None:
    llm = FakeAsyncLLM()
    engine = vllm_engine(llm)

    async def scenario() -> None:
        await engine.abort("never-seen")
        await collect(engine, request(max_tokens=2))
        await engine.abort("r1")

    asyncio.run(scenario())
    assert llm.aborted == []


class CharTokenizer:
    """One id per printable ASCII character; id 0 is padding. Enough of a tokenizer for
    the engine (call, decode) without downloading one."""

    CHARS = [chr(c) for c in range(32, 127)]

    def __init__(self, torch: Any, batch_encoding: Any) -> None:
        self.torch = torch
        self.batch_encoding = batch_encoding
        self.vocab_size = len(self.CHARS) + 1

    def __call__(self, text: str, return_tensors: str = "pt") -> Any:
        ids = [self.CHARS.index(c) + 1 if c in self.CHARS else 1 for c in text]
        return self.batch_encoding(
            {
                "input_ids": self.torch.tensor([ids]),
                "attention_mask": self.torch.ones((1, len(ids)), dtype=self.torch.long),
            }
        )

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(self.CHARS[i - 1] for i in ids if 0 < i <= len(self.CHARS))


def test_transformers_engine_streams_and_aborts_on_a_tiny_random_gpt2() -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    tokenizer = CharTokenizer(torch, transformers.BatchEncoding)
    config = transformers.GPT2Config(
        vocab_size=tokenizer.vocab_size,
        n_positions=256,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=0,
        eos_token_id=None,  # random weights must not stop early: the length is known
        pad_token_id=0,
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    engine = TransformersEngine(model="tiny-random-gpt2", model_obj=model, tokenizer=tokenizer)

    async def scenario() -> tuple[list[TokenDelta | Finished], list[TokenDelta | Finished]]:
        full = await collect(engine, request("full", prompt="hello", max_tokens=12))
        aborted: list[TokenDelta | Finished] = []
        async for item in engine.generate(request("stop-me", prompt="hello", max_tokens=200)):
            aborted.append(item)
            if len(aborted) == 2:
                await engine.abort("stop-me")
        await engine.close()
        return full, aborted

    full, aborted = asyncio.run(scenario())
    deltas, finished = split(full)
    assert (finished.reason, finished.prompt_tokens, finished.completion_tokens) == (
        "length",
        5,
        12,
    )
    assert sum(d.tokens for d in deltas) == 12
    deltas, finished = split(aborted)
    assert finished.reason == "aborted"
    assert len(deltas) == 2 == finished.completion_tokens
