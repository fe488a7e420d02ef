"""The OpenAI-compatible engine against a fake provider on loopback that speaks the real
protocol (tests/harness/fake_openai.py), and against canned byte streams for the framings
the fake does not produce. Every test also checks that nothing is left running: no stream
still open on the server and no request left in the engine's table."""

import asyncio
import socket
import time
from collections.abc import Callable, Iterator

import pytest

from tests.harness.fake_openai import TEMPLATE_TOKENS, FakeOpenAI, Fault
from tests.workers.engine_streams import collect
from workers.inference.base import (
    EngineError,
    EngineRejected,
    EngineUnavailable,
    Finished,
    GenerationRequest,
    TokenDelta,
)
from workers.inference.openai import OpenAIEngine

KEY = "sk-test-secret-4242"
PROMPT = "tell me about the river and its gates"


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(tokens_per_s=0) as server:
        yield server


def engine_for(fake: FakeOpenAI, **kwargs: float) -> OpenAIEngine:
    return OpenAIEngine(base_url=fake.base_url, model="fake-model", api_key=KEY, **kwargs)


def request(
    request_id: str = "r1",
    *,
    max_tokens: int = 64,
    temperature: float = 0.0,
    extra: dict[str, object] | None = None,
) -> GenerationRequest:
    return GenerationRequest(
        request_id=request_id,
        prompt=PROMPT,
        max_tokens=max_tokens,
        temperature=temperature,
        extra=extra or {},
    )


def failure(engine: OpenAIEngine, req: GenerationRequest | None = None) -> EngineError:
    with pytest.raises(EngineError) as caught:
        asyncio.run(collect(engine, req or request()))
    return caught.value


def wait_until(condition: Callable[[], bool], timeout_s: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def assert_nothing_left(fake: FakeOpenAI, engine: OpenAIEngine) -> None:
    assert engine.open_requests() == []
    assert wait_until(lambda: fake.active_streams() == 0), "the server is still streaming"


def test_streams_the_answer_with_the_servers_usage(fake: FakeOpenAI) -> None:
    engine = engine_for(fake)
    req = request(temperature=0.3, extra={"top_p": 0.9})
    deltas, finished = asyncio.run(collect(engine, req))

    assert "".join(d.text for d in deltas) == fake.text_for(PROMPT, 64)
    assert len(deltas) == fake.answer_words and all(d.tokens == 1 for d in deltas)
    assert finished.reason == "stop"
    assert finished.prompt_tokens == len(PROMPT.split()) + TEMPLATE_TOKENS  # the usage chunk
    assert finished.completion_tokens == fake.answer_words
    [record] = fake.streams
    assert record.authorization == f"Bearer {KEY}"
    assert record.path == "/v1/chat/completions"
    assert record.body == {
        "model": "fake-model",
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": 64,
        "temperature": 0.3,
        "stream": True,
        "stream_options": {"include_usage": True},
        "top_p": 0.9,
    }
    # The handler marks the stream completed after its last write, which the client may
    # have read already: wait for the handler to end before looking.
    assert_nothing_left(fake, engine)
    assert record.completed and record.client_closed_at is None


def test_length_finish_and_estimated_usage_without_a_usage_chunk(fake: FakeOpenAI) -> None:
    engine = OpenAIEngine(base_url=fake.base_url, model="fake-model")  # no key
    req = request(max_tokens=5, extra={"stream_options": {"include_usage": False}})
    deltas, finished = asyncio.run(collect(engine, req))

    assert "".join(d.text for d in deltas) == fake.text_for(PROMPT, 5)
    assert finished.reason == "length"
    assert finished.prompt_tokens == len(PROMPT.split())  # the engine's estimate
    assert finished.completion_tokens == len(deltas) == 5
    assert fake.streams[0].authorization is None
    assert_nothing_left(fake, engine)


@pytest.mark.parametrize("status", [500, 503])
def test_server_errors_are_unavailable(fake: FakeOpenAI, status: int) -> None:
    fake.faults = [Fault(status=status, message=f"overloaded, key {KEY} rejected")]
    engine = engine_for(fake)
    error = failure(engine)

    assert isinstance(error, EngineUnavailable) and error.transient
    assert error.retry_after_s is None
    port = fake.base_url.split(":")[2].split("/")[0]
    assert f"127.0.0.1:{port}" in str(error) and f"HTTP {status}" in str(error)
    assert KEY not in str(error)  # even when the server echoes it
    assert_nothing_left(fake, engine)


def test_rate_limit_carries_retry_after(fake: FakeOpenAI) -> None:
    fake.faults = [Fault(status=429, retry_after="2", message="Rate limit reached")]
    engine = engine_for(fake)
    error = failure(engine)

    assert isinstance(error, EngineUnavailable)
    assert error.retry_after_s == 2
    assert "HTTP 429" in str(error) and "Rate limit reached" in str(error)
    assert_nothing_left(fake, engine)


def test_bad_request_is_rejected_with_the_servers_message(fake: FakeOpenAI) -> None:
    message = "max_tokens is too large: 64. This model supports at most 32 completion tokens."
    fake.faults = [Fault(status=400, message=message + " " + "x" * 400)]
    engine = engine_for(fake)
    error = failure(engine)

    assert isinstance(error, EngineRejected) and not error.transient
    assert "HTTP 400" in str(error) and message in str(error)
    assert len(str(error)) < 300  # the excerpt is cut short, not the whole body
    assert_nothing_left(fake, engine)


@pytest.mark.parametrize(
    "fault", [Fault(stall_after=3), Fault(stall_headers=True)], ids=["mid-stream", "headers"]
)
def test_a_stalled_server_is_unavailable(fake: FakeOpenAI, fault: Fault) -> None:
    fake.faults = [fault]
    engine = engine_for(fake, stall_timeout_s=0.3)
    error = failure(engine)

    assert isinstance(error, EngineUnavailable) and "stalled" in str(error)
    assert_nothing_left(fake, engine)
    assert fake.streams[0].client_closed_at is not None  # the engine hung up on it


def test_a_dropped_stream_is_unavailable(fake: FakeOpenAI) -> None:
    fake.faults = [Fault(drop_after=4)]
    engine = engine_for(fake)
    error = failure(engine)

    assert isinstance(error, EngineUnavailable)
    assert "dropped after 4 tokens" in str(error)
    assert fake.streams[0].tokens_sent == 4 and not fake.streams[0].completed
    assert_nothing_left(fake, engine)


def test_abort_mid_stream_ends_with_finished_aborted() -> None:
    with FakeOpenAI(tokens_per_s=50, answer_words=500) as fake:
        engine = engine_for(fake)

        async def scenario() -> tuple[list[TokenDelta], Finished, float]:
            five = asyncio.Event()
            deltas: list[TokenDelta] = []

            async def consume() -> Finished:
                async for item in engine.generate(request("r-abort", max_tokens=500)):
                    if isinstance(item, Finished):
                        return item
                    deltas.append(item)
                    if len(deltas) == 5:
                        five.set()
                raise AssertionError("the stream ended without Finished")

            consumer = asyncio.create_task(consume())
            await five.wait()
            await asyncio.sleep(0)  # the consumer is back in its read for token 6
            before = time.time()
            await engine.abort("r-abort")
            await engine.abort("no-such-request")  # ignored
            return deltas, await consumer, before

        deltas, finished, abort_called = asyncio.run(scenario())

        assert finished.reason == "aborted"
        assert finished.completion_tokens == len(deltas)
        assert finished.prompt_tokens == len(PROMPT.split())
        assert finished.at >= abort_called
        assert_nothing_left(fake, engine)
        [record] = fake.streams
        assert record.client_closed_at is not None and not record.completed
        assert record.tokens_sent - len(deltas) <= 2


def test_abort_before_the_response_starts(fake: FakeOpenAI) -> None:
    fake.faults = [Fault(stall_headers=True)]
    engine = engine_for(fake)

    async def scenario() -> Finished:
        stream = engine.generate(request("r-early"))
        first = asyncio.ensure_future(anext(stream))
        while fake.active_streams() == 0:  # the request reached the server, which says nothing
            await asyncio.sleep(0.01)
        await engine.abort("r-early")
        item = await first
        with pytest.raises(StopAsyncIteration):
            await anext(stream)
        assert isinstance(item, Finished)
        return item

    finished = asyncio.run(scenario())

    assert finished.reason == "aborted" and finished.completion_tokens == 0
    assert_nothing_left(fake, engine)
    assert fake.streams[0].client_closed_at is not None


def test_a_consumer_that_stops_early_closes_the_connection() -> None:
    with FakeOpenAI(tokens_per_s=100, answer_words=200) as fake:
        engine = engine_for(fake)

        async def scenario() -> None:
            stream = engine.generate(request("r-early-exit", max_tokens=200))
            async for item in stream:
                assert isinstance(item, TokenDelta)
                break
            await stream.aclose()  # type: ignore[attr-defined]

        asyncio.run(scenario())

        assert_nothing_left(fake, engine)
        assert fake.streams[0].client_closed_at is not None


def test_close_aborts_every_open_request() -> None:
    with FakeOpenAI(tokens_per_s=50, answer_words=200) as fake:
        engine = engine_for(fake)

        async def scenario() -> list[Finished]:
            async def consume(request_id: str) -> Finished:
                async for item in engine.generate(request(request_id, max_tokens=200)):
                    if isinstance(item, Finished):
                        return item
                raise AssertionError("the stream ended without Finished")

            consumers = [asyncio.create_task(consume(f"r{i}")) for i in range(3)]
            while len(engine.open_requests()) < 3 or fake.active_streams() < 3:
                await asyncio.sleep(0.01)
            await engine.close()
            return list(await asyncio.gather(*consumers))

        finished = asyncio.run(scenario())

        assert [f.reason for f in finished] == ["aborted"] * 3
        assert_nothing_left(fake, engine)


def test_connection_refused_is_unavailable() -> None:
    with socket.socket() as probe:  # a port that was free a moment ago, now closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    engine = OpenAIEngine(base_url=f"http://127.0.0.1:{port}/v1", model="m", api_key=KEY)
    error = failure(engine)

    assert isinstance(error, EngineUnavailable)
    assert f"127.0.0.1:{port}" in str(error) and KEY not in str(error)
    assert engine.open_requests() == []


@pytest.mark.parametrize(
    ("base_url", "problem"),
    [
        ("ftp://example.com/v1", "http or https"),
        ("example.com/v1", "http or https"),
        ("http:///v1", "no host"),
        ("http://example.com:99999/v1", "invalid port"),
        ("https://user:pw@example.com/v1", "credentials"),
        ("http://example.com/v1?x=1", "query"),
    ],
)
def test_an_invalid_base_url_is_refused(base_url: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        OpenAIEngine(base_url=base_url, model="m")


# Canned responses: the framings and mistakes a real server may produce that the fake does not.
SSE_BODY = (
    b": keep-alive comment\r\n\r\n"
    b'data: {"choices":[{"index":0,"delta":{"content":"Hel"},"finish_reason":null}]}\r\n\r\n'
    b"event: ignored\n"
    b'data: {"choices":[{"index":0,"delta":{"content":"lo"},"finish_reason":"stop"}]}\n\n'
    b"data: [DONE]\n\n"
)


def canned(head: bytes, body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n" + head + b"\r\n" + body


def chunked(body: bytes, size: int = 7) -> bytes:
    pieces = [body[i : i + size] for i in range(0, len(body), size)]
    return b"".join(b"%x;ext=1\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


@pytest.mark.parametrize(
    "response",
    [
        canned(b"Content-Length: %d\r\n" % len(SSE_BODY), SSE_BODY),
        canned(b"", SSE_BODY),  # delimited by the server closing the connection
        canned(b"Transfer-Encoding: chunked\r\n", chunked(SSE_BODY)),
    ],
    ids=["content-length", "until-close", "chunked"],
)
def test_framings_of_the_event_stream(response: bytes) -> None:
    deltas, finished = asyncio.run(against_canned(response))

    assert [d.text for d in deltas] == ["Hel", "lo"]
    assert finished.reason == "stop" and finished.completion_tokens == 2


def test_malformed_json_in_the_stream_is_unavailable() -> None:
    body = SSE_BODY.replace(b'"content":"lo"', b'"content":lo')
    with pytest.raises(EngineUnavailable, match="malformed JSON") as caught:
        asyncio.run(against_canned(canned(b"", body)))
    assert "after 1 tokens" in str(caught.value)


async def against_canned(response: bytes) -> tuple[list[TokenDelta], Finished]:
    """Serves `response` to one request, in pieces, then closes the connection."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        for i in range(0, len(response), 5):
            writer.write(response[i : i + 5])
            await writer.drain()
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    engine = OpenAIEngine(base_url=f"http://127.0.0.1:{port}/v1", model="m")
    try:
        return await collect(engine, request())
    finally:
        assert engine.open_requests() == []
        server.close()
        await server.wait_closed()
