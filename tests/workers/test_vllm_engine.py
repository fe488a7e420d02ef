"""The vLLM adapter against a fake AsyncLLM that behaves like vLLM V1; the transformers
engine against a tiny random GPT-2 where torch and transformers are installed (GPU nodes).

No database: plain functions that run their own event loop."""

import asyncio
import enum
import sys
import time
import types
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, cast

import pytest

from tests.harness.fake_vllm import (
    STEP_S,
    AbortStyle,
    FakeAsyncLLM,
    FakeCompletion,
    FakeOutput,
    FakeSamplingParams,
)
from workers.inference.base import (
    EngineRejected,
    EngineUnavailable,
    Finished,
    GenerationRequest,
    TokenDelta,
)
from workers.inference.transformers_engine import TransformersEngine
from workers.inference.vllm import VLLMEngine


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
