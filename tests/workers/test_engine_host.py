"""EngineHost with the simulated engine: a Generation is a blocking iterator fed from the
host's loop thread; stop signals (direct, matched by run/step/tenant, deadlines, and a
consumer that leaves early) abort the request in the engine, keep the first signal, and
count what was produced after it. Each test has its own host and checks that nothing is
left running, neither in the host's registry nor in the engine's batch."""

import asyncio
import itertools
import time
from collections.abc import Iterator

import pytest

from workers.inference.base import EngineUnavailable, GenerationRequest, TokenDelta
from workers.inference.host import EngineHost, Generation, Owner, StopSignal
from workers.inference.registry import ModelSpec, parse_entry
from workers.inference.simulated import SimulatedEngine, tokens_for

PROMPT = "tell me about the river and its gates"
# 500 tokens/s: a 1000-token budget is 1 to 2 s of generation, far longer than any stop takes.
LONG = 1000


def spec(**faults: object) -> ModelSpec:
    params: dict[str, object] = {"tokens_per_s": 500, "ttft_ms": 0}
    if faults:
        params["faults"] = faults
    return parse_entry("sim", {"engine": "simulated", "params": params})


def request(request_id: str = "step-1:1", *, max_tokens: int = 20) -> GenerationRequest:
    return GenerationRequest(request_id=request_id, prompt=PROMPT, max_tokens=max_tokens)


def owner(step: str = "step-1", run: str = "run-1", tenant: int = 1) -> Owner:
    return Owner(step_id=step, run_id=run, tenant_id=tenant)


@pytest.fixture
def host() -> Iterator[EngineHost]:
    host = EngineHost()
    yield host
    # Close the engines and the loop thread this test started.
    loop = host.loop

    engine = host.engine(spec())  # every test's model is "sim": this is its engine

    async def shutdown() -> None:
        await engine.close()
        await asyncio.sleep(0)  # lets the decode loop's cancellation land
        await loop.shutdown_asyncgens()

    asyncio.run_coroutine_threadsafe(shutdown(), loop).result(timeout=5)
    loop.call_soon_threadsafe(loop.stop)
    for _ in range(500):
        if not loop.is_running():
            break
        time.sleep(0.01)
    loop.close()


def engine_of(host: EngineHost) -> SimulatedEngine:
    engine = host.engine(spec())
    assert isinstance(engine, SimulatedEngine)
    return engine


def wait_engine_idle(host: EngineHost) -> int:
    """The engine's active requests once it has settled (aborts travel to the loop thread);
    bounded polling, not a timing claim."""
    engine = engine_of(host)
    for _ in range(500):
        if engine.active_requests == 0:
            break
        time.sleep(0.01)
    return engine.active_requests


def test_a_generation_yields_its_deltas_then_ends(host: EngineHost) -> None:
    generation = host.start(spec(), request(), owner())
    assert host.running() == [generation]
    deltas = list(generation)
    answer = tokens_for(PROMPT, 20)
    assert "".join(d.text for d in deltas) == "".join(answer)
    assert generation.finished is not None and generation.finished.reason in ("stop", "length")
    assert generation.completion_tokens == generation.finished.completion_tokens == len(answer)
    assert generation.stop_signal is None
    assert generation.wasted_tokens == 0 and generation.stop_latency_ms is None
    assert host.running() == []
    assert wait_engine_idle(host) == 0


def test_stop_mid_stream_aborts_it_and_keeps_the_first_signal(host: EngineHost) -> None:
    generation = host.start(spec(), request(max_tokens=LONG), owner())
    deltas: list[TokenDelta] = []
    first = StopSignal("cancelled", time.time(), "by the owner")
    for delta in generation:
        deltas.append(delta)
        if len(deltas) == 3:
            assert generation.stop(first) is True
            assert generation.stop(StopSignal("deadline", time.time())) is False
    assert generation.finished is not None and generation.finished.reason == "aborted"
    assert generation.stop_signal == first
    assert 3 <= len(deltas) == generation.completion_tokens < LONG // 2
    assert generation.stop_latency_ms is not None and generation.stop_latency_ms >= 0
    assert host.running() == []
    assert wait_engine_idle(host) == 0


def test_wasted_tokens_count_only_what_was_produced_after_the_signal(host: EngineHost) -> None:
    generation = host.start(spec(), request(max_tokens=LONG), owner())
    deltas: list[TokenDelta] = []
    for delta in generation:
        deltas.append(delta)
        if len(deltas) == 6:
            # The decision to stop was taken when the 3rd token was produced; it arrives late.
            generation.stop(StopSignal("cancelled", deltas[2].at))
    # One token per decode step: every delta after the 3rd was produced after the signal.
    assert all(a.at < b.at for a, b in itertools.pairwise(deltas))
    assert len(deltas) >= 6
    assert generation.wasted_tokens == len(deltas) - 3
    assert generation.stop_latency_ms is not None
    assert host.running() == []


def test_stop_matching_stops_only_the_matching_generations(host: EngineHost) -> None:
    by_run = host.start(spec(), request("a:1", max_tokens=LONG), owner("a", "run-a", 1))
    by_step = host.start(spec(), request("b:1", max_tokens=LONG), owner("b", "run-b", 1))
    by_tenant = host.start(spec(), request("c:1", max_tokens=LONG), owner("c", "run-c", 2))
    spared = host.start(spec(), request("d:1", max_tokens=20), owner("d", "run-d", 1))
    signal = StopSignal("cancelled", time.time())

    assert host.stop_matching(signal, runs={"run-a", "run-unknown"}) == 1
    assert host.stop_matching(signal, steps={"b"}) == 1
    assert host.stop_matching(StopSignal("budget", time.time()), tenant=2) == 1
    assert host.stop_matching(signal, runs={"run-a"}, steps={"b"}, tenant=2) == 0  # already
    assert host.stop_matching(signal, runs={"nobody"}, tenant=99) == 0

    for generation in (by_run, by_step, by_tenant, spared):
        list(generation)
    assert [g.finished.reason for g in (by_run, by_step, by_tenant)] == ["aborted"] * 3  # type: ignore[union-attr]
    assert by_tenant.stop_signal is not None and by_tenant.stop_signal.kind == "budget"
    assert spared.stop_signal is None and spared.finished is not None
    assert spared.finished.reason in ("stop", "length")
    assert spared.completion_tokens == len(tokens_for(PROMPT, 20))
    assert host.running() == []
    assert wait_engine_idle(host) == 0


def test_a_deadline_already_past_aborts_at_once(host: EngineHost) -> None:
    at = time.time() - 1.0
    generation = host.start(
        spec(), request(max_tokens=LONG), owner(), deadline=(at, "step_deadline")
    )
    list(generation)
    assert generation.finished is not None and generation.finished.reason == "aborted"
    assert generation.stop_signal == StopSignal("step_deadline", at)
    assert generation.completion_tokens < LONG // 2
    # Every token it produced was produced after the deadline: all of them were wasted.
    assert generation.wasted_tokens == generation.completion_tokens
    assert host.running() == []
    assert wait_engine_idle(host) == 0


def test_a_consumer_that_fails_mid_stream_abandons_its_generation(host: EngineHost) -> None:
    generation = host.start(spec(), request(max_tokens=LONG), owner())
    read = 0
    with pytest.raises(RuntimeError, match="consumer failed"):
        for _ in generation:
            read += 1
            if read == 3:
                raise RuntimeError("consumer failed")
    assert generation.stop_signal is not None and generation.stop_signal.kind == "abandoned"
    assert host.running() == []
    # The engine is not left generating for nobody.
    assert wait_engine_idle(host) == 0


def test_an_engine_failure_reaches_the_consumer_and_leaves_nothing_running(
    host: EngineHost,
) -> None:
    faulted = spec(kind="drop", first_attempts=1, after_tokens=2)
    generation: Generation = host.start(faulted, request(max_tokens=LONG), owner())
    deltas: list[TokenDelta] = []
    with pytest.raises(EngineUnavailable, match="dropped after 2 tokens"):
        for delta in generation:
            deltas.append(delta)
    assert len(deltas) == 2 and generation.finished is None
    assert host.running() == []
    assert wait_engine_idle(host) == 0
