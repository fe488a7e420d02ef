"""The simulated engine on its own, driven with asyncio.run: its text, its finish reasons,
abort, the zombie a consumer leaves when it walks away without aborting, continuous
batching, and every injected fault. Assertions are on tokens, decode steps and the engine's
table of active requests; where a step's duration matters the loop runs on a virtual clock,
never the wall clock. Every test ends with nothing left in the engine's table."""

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from functools import partial
from typing import Any

import pytest

from tests.workers.engine_streams import collect
from workers.inference.base import EngineUnavailable, Finished, GenerationRequest, TokenDelta
from workers.inference.simulated import Faults, SimulatedEngine, prompt_tokens, tokens_for

PROMPT = "tell me about the river and its gates"
TOKENS_PER_S = 1000.0


def engine(**kwargs: Any) -> SimulatedEngine:
    return SimulatedEngine(
        ttft_s=0.0, tokens_per_s=kwargs.pop("tokens_per_s", TOKENS_PER_S), **kwargs
    )


def request(
    request_id: str = "r1", *, prompt: str = PROMPT, max_tokens: int = 20, attempt: int = 1
) -> GenerationRequest:
    return GenerationRequest(
        request_id=request_id, prompt=prompt, max_tokens=max_tokens, attempt=attempt
    )


def run(eng: SimulatedEngine, work: Callable[[], Awaitable[Any]]) -> Any:
    """Runs `work` on a fresh loop, then closes the engine (cancelling its decode loop)."""

    async def main() -> Any:
        try:
            return await work()
        finally:
            await eng.close()

    return asyncio.run(main())


def failure(eng: SimulatedEngine, req: GenerationRequest) -> tuple[list[TokenDelta], Exception]:
    """The deltas a failing stream sent before it raised, and what it raised."""
    deltas: list[TokenDelta] = []

    async def work() -> Exception:
        try:
            async for item in eng.generate(req):
                assert isinstance(item, TokenDelta), f"a failing stream finished: {item}"
                deltas.append(item)
        except EngineUnavailable as exc:
            return exc
        raise AssertionError("the stream did not fail")

    return deltas, run(eng, work)


async def wait_idle(eng: SimulatedEngine, limit_steps: int = 10_000) -> None:
    """Yields to the loop until the engine has no active request (bounded, never timed)."""
    for _ in range(limit_steps):
        if eng.active_requests == 0:
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"{eng.active_requests} request(s) still active")


class VirtualClock:
    """The loop's time, advanced only by the decode loop's own sleeps: a step's length is
    then exactly what the engine asked for, whatever the machine's load."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def time(self) -> float:
        return self.now


@pytest.fixture
def virtual_clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[VirtualClock]:
    clock = VirtualClock()
    real_sleep = asyncio.sleep

    async def sleep(delay: float, result: Any = None) -> Any:
        clock.sleeps.append(delay)
        clock.now += max(0.0, delay)
        return await real_sleep(0, result)

    monkeypatch.setattr(asyncio, "sleep", sleep)
    yield clock


def on_virtual_time(clock: VirtualClock) -> None:
    loop = asyncio.get_running_loop()
    loop.time = clock.time  # type: ignore[method-assign]


# --- text and finish reasons ------------------------------------------------------------


def test_the_answer_is_a_pure_function_of_the_prompt() -> None:
    first_engine, second_engine = engine(), engine()
    first, _ = run(first_engine, lambda: collect(first_engine, request("a")))
    second, _ = run(second_engine, lambda: collect(second_engine, request("b")))
    text = "".join(d.text for d in first)
    assert text == "".join(d.text for d in second) == "".join(tokens_for(PROMPT, 20))
    assert text[0].isupper() and all(d.tokens == 1 for d in first)
    assert tokens_for(PROMPT + " please", 20) != tokens_for(PROMPT, 20)
    assert first_engine.active_requests == second_engine.active_requests == 0


@pytest.mark.parametrize("max_tokens", [1, 2, 7, 40, 256])
def test_an_answer_spends_between_half_and_all_of_its_budget(max_tokens: int) -> None:
    lengths = {len(tokens_for(f"prompt number {i}", max_tokens)) for i in range(50)}
    assert min(lengths) >= max(1, max_tokens // 2)
    assert max(lengths) <= max_tokens
    if max_tokens >= 7:
        assert len(lengths) > 1  # the length depends on the prompt


def prompt_with_length(max_tokens: int, *, full: bool) -> str:
    for i in range(1000):
        prompt = f"question {i} about the gate"
        if (len(tokens_for(prompt, max_tokens)) == max_tokens) == full:
            return prompt
    raise AssertionError("no such prompt")


@pytest.mark.parametrize(("full", "reason"), [(True, "length"), (False, "stop")])
def test_the_finish_reason_is_length_only_when_the_whole_budget_was_spent(
    full: bool, reason: str
) -> None:
    prompt = prompt_with_length(12, full=full)
    eng = engine()
    deltas, finished = run(eng, lambda: collect(eng, request(prompt=prompt, max_tokens=12)))
    assert finished.reason == reason
    assert finished.completion_tokens == len(deltas) == len(tokens_for(prompt, 12))
    assert finished.prompt_tokens == prompt_tokens(prompt) == len(prompt.split())
    assert eng.active_requests == 0


# --- abort and the zombie ---------------------------------------------------------------


def test_abort_mid_stream_finishes_aborted_and_stops_producing(
    virtual_clock: VirtualClock,
) -> None:
    eng = engine()
    aborted = request("aborted", max_tokens=200)
    other = request("other", prompt="another question", max_tokens=40)

    async def read_then_abort() -> tuple[int, list[TokenDelta], Finished]:
        deltas: list[TokenDelta] = []
        finished: list[Finished] = []
        read_at_abort = 0
        async for item in eng.generate(aborted):
            if isinstance(item, Finished):
                finished.append(item)
                continue
            assert not finished, "a token came after Finished"
            deltas.append(item)
            if len(deltas) == 3:
                read_at_abort = len(deltas)
                await eng.abort(aborted.request_id)
                await eng.abort(aborted.request_id)  # a second abort is ignored
        [end] = finished
        return read_at_abort, deltas, end

    async def work() -> Any:
        on_virtual_time(virtual_clock)
        return await asyncio.gather(read_then_abort(), collect(eng, other))

    (read_at_abort, deltas, finished), (_, other_finished) = run(eng, work)
    assert finished.reason == "aborted"
    # Whatever was already queued is delivered; the engine made at most one token more.
    assert finished.completion_tokens == len(deltas)
    assert read_at_abort <= finished.completion_tokens <= read_at_abort + 1
    # The decode loop went on for the other request while the aborted one gained nothing.
    assert other_finished.completion_tokens == len(tokens_for("another question", 40))
    assert eng.decode_steps >= other_finished.completion_tokens > finished.completion_tokens
    assert eng.active_requests == 0


def test_aborting_an_unknown_or_finished_request_is_ignored() -> None:
    eng = engine()

    async def work() -> Finished:
        await eng.abort("never-started")
        _, finished = await collect(eng, request(max_tokens=5))
        await eng.abort("r1")
        return finished

    finished = run(eng, work)
    assert finished.reason in ("stop", "length")
    assert eng.active_requests == 0


def test_a_consumer_that_stops_reading_without_abort_leaves_a_zombie_generating() -> None:
    eng = engine()
    req = request("zombie", max_tokens=60)
    answer = tokens_for(PROMPT, 60)

    async def work() -> tuple[int, list[TokenDelta], Finished]:
        stream = eng.generate(req)
        first = await anext(stream)
        assert isinstance(first, TokenDelta)
        # The consumer walks away: it neither reads on nor aborts.
        assert eng.active_requests == 1
        await wait_idle(eng)
        steps_while_away = eng.decode_steps
        # Everything was generated for nobody; it was waiting in the stream all along.
        rest: list[TokenDelta] = []
        finished: Finished | None = None
        async for item in stream:
            if isinstance(item, Finished):
                finished = item
            else:
                rest.append(item)
        assert finished is not None
        return steps_while_away, [first, *rest], finished

    steps, deltas, finished = run(eng, work)
    assert finished.reason != "aborted"
    assert finished.completion_tokens == len(deltas) == len(answer)
    assert "".join(d.text for d in deltas) == "".join(answer)
    assert steps >= len(answer)
    assert eng.active_requests == 0


# --- continuous batching ----------------------------------------------------------------


def test_concurrent_requests_within_capacity_share_every_decode_step(
    virtual_clock: VirtualClock,
) -> None:
    eng = engine(batch_capacity=8)
    prompts = [f"question {i} about the river" for i in range(6)]
    counts = [len(tokens_for(p, 30)) for p in prompts]

    async def reader(req: GenerationRequest) -> list[int]:
        """The decode step that produced each of this request's tokens."""
        steps = []
        async for item in eng.generate(req):
            if isinstance(item, TokenDelta):
                steps.append(eng.decode_steps)
        return steps

    async def work() -> Any:
        on_virtual_time(virtual_clock)
        return await asyncio.gather(
            *(reader(request(f"r{i}", prompt=p, max_tokens=30)) for i, p in enumerate(prompts))
        )

    per_request = run(eng, work)
    assert [len(steps) for steps in per_request] == counts
    # One token per request per step, all on the same steps: not N times the steps.
    assert max(counts) <= eng.decode_steps <= max(counts) + 1 < sum(counts)
    assert len({steps[0] for steps in per_request}) == 1
    for steps in per_request:
        assert steps == list(range(steps[0], steps[0] + len(steps)))
    assert eng.active_requests == 0


@pytest.mark.parametrize(("requests", "slowdown"), [(2, 1.0), (4, 1.0), (8, 2.0), (12, 3.0)])
def test_past_capacity_each_decode_step_slows_in_proportion(
    virtual_clock: VirtualClock, requests: int, slowdown: float
) -> None:
    eng = engine(batch_capacity=4, tokens_per_s=100.0)
    # Same prompt, same length: the batch stays the same size until they all finish.
    reqs = [request(f"r{i}", max_tokens=10) for i in range(requests)]
    count = len(tokens_for(PROMPT, 10))

    async def work() -> Any:
        on_virtual_time(virtual_clock)
        return await asyncio.gather(*(collect(eng, r) for r in reqs))

    results = run(eng, work)
    assert all(finished.completion_tokens == count for _, finished in results)
    assert eng.decode_steps == count
    # Every step of a full batch lasted slowdown / tokens_per_s of loop time.
    assert virtual_clock.sleeps == pytest.approx([slowdown / 100.0] * count)
    assert virtual_clock.now == pytest.approx(count * slowdown / 100.0)
    assert eng.active_requests == 0


# --- injected faults --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "status", "retry_after"), [("unavailable", "503", None), ("rate_limited", "429", 1.0)]
)
def test_refusals_fail_before_any_token(kind: str, status: str, retry_after: float | None) -> None:
    eng = engine(faults=Faults(kind=kind, first_attempts=1))
    deltas, error = failure(eng, request())
    assert deltas == []
    assert f"injected {status} on attempt 1" in str(error)
    assert error.retry_after_s == retry_after  # type: ignore[attr-defined]
    assert eng.active_requests == 0


def test_first_attempts_fail_and_later_attempts_succeed() -> None:
    faults = Faults(kind="unavailable", first_attempts=2)
    for attempt in (1, 2):
        eng = engine(faults=faults)
        _, error = failure(eng, request(attempt=attempt))
        assert f"on attempt {attempt}" in str(error)
        assert eng.active_requests == 0
    eng = engine(faults=faults)
    deltas, finished = run(eng, lambda: collect(eng, request(attempt=3)))
    assert finished.reason in ("stop", "length") and len(deltas) == len(tokens_for(PROMPT, 20))
    assert eng.active_requests == 0


def test_a_fault_rate_is_decided_by_the_request_id() -> None:
    faults = Faults(kind="unavailable", rate=0.3)
    ids = [f"step-{i}:1" for i in range(400)]
    hit = [i for i in ids if faults.hits(request(i))]
    assert 0 < len(hit) < len(ids)
    assert 400 * 0.2 < len(hit) < 400 * 0.4
    # Repeatable: the same ids, on any attempt and any other Faults of that rate.
    assert [i for i in ids if Faults(rate=0.3).hits(request(i, attempt=5))] == hit
    assert not any(Faults(rate=0.0).hits(request(i)) for i in ids)
    assert all(Faults(rate=1.0).hits(request(i)) for i in ids)

    failing, passing = hit[0], next(i for i in ids if i not in hit)
    for _ in range(2):
        eng = engine(faults=faults)
        _, error = failure(eng, request(failing))
        assert "injected 503" in str(error)
        healthy = engine(faults=faults)
        _, finished = run(healthy, partial(collect, healthy, request(passing)))
        assert finished.reason in ("stop", "length")
        assert healthy.active_requests == 0


def test_a_stalled_stream_sends_some_tokens_then_is_unavailable() -> None:
    eng = engine(faults=Faults(kind="stall", first_attempts=1, after_tokens=3, stall_s=0.05))
    deltas, error = failure(eng, request(max_tokens=40))
    assert len(deltas) == 3
    assert "after 3 tokens (no token for 0.05s)" in str(error)
    assert eng.active_requests == 0


def test_a_dropped_stream_sends_some_tokens_then_is_unavailable() -> None:
    eng = engine(faults=Faults(kind="drop", first_attempts=1, after_tokens=4))
    deltas, error = failure(eng, request(max_tokens=40))
    assert len(deltas) == 4
    assert "stream dropped after 4 tokens" in str(error)
    assert eng.active_requests == 0


def test_a_timed_out_stream_sends_nothing_then_is_unavailable() -> None:
    eng = engine(faults=Faults(kind="timeout", first_attempts=1, stall_s=0.05))
    deltas, error = failure(eng, request(max_tokens=40))
    assert deltas == []
    assert "after 0 tokens (no token for 0.05s)" in str(error)
    assert eng.active_requests == 0


def test_a_faulted_request_does_not_disturb_a_healthy_one_beside_it() -> None:
    eng = engine(faults=Faults(kind="drop", first_attempts=1, after_tokens=2))
    healthy = request("healthy", max_tokens=20, attempt=2)

    async def work() -> Any:
        async def faulted() -> Exception:
            try:
                await collect(eng, request("faulted", max_tokens=20, attempt=1))
            except EngineUnavailable as exc:
                return exc
            raise AssertionError("the faulted stream did not fail")

        return await asyncio.gather(faulted(), collect(eng, healthy))

    error, (deltas, finished) = run(eng, work)
    assert "dropped after 2 tokens" in str(error)
    assert finished.completion_tokens == len(deltas) == len(tokens_for(PROMPT, 20))
    assert eng.active_requests == 0


def test_a_stalled_stream_says_stalled() -> None:
    eng = engine(faults=Faults(kind="stall", first_attempts=1, after_tokens=3, stall_s=0.05))
    _, error = failure(eng, request(max_tokens=40))
    assert "stalled after 3 tokens" in str(error)
