"""An engine for any OpenAI-compatible chat-completions endpoint (OpenAI itself, vLLM's or
llama.cpp's server, a gateway), streamed as Server-Sent Events.

Written on asyncio streams with the standard library alone. Each request gets its own
HTTP/1.1 connection (`Connection: close`), so aborting a request is closing its socket:
OpenAI-compatible servers take a closed connection as the end of the generation, and nothing
else on the connection can be hurt. Every wait for the server is bounded: connecting by
`connect_timeout_s`, and every read by `stall_timeout_s` (a server that stops sending in the
middle of a stream is as unavailable as one that never answers).

The API key goes into the Authorization header and nowhere else: error messages name the
server by host:port, and an error body that echoes the key has it masked.
"""

import asyncio
import contextlib
import json
import re
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

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
from workers.inference.http_wire import (
    BadStream,
    Decoder,
    Head,
    SseParser,
    UntilCloseDecoder,
    decoder_for,
    parse_head,
)

_READ_SIZE = 64 * 1024
_MAX_HEAD_BYTES = 64 * 1024  # a response head larger than this is not a chat server's
_MAX_ERROR_BODY_BYTES = 64 * 1024  # enough for any error message worth quoting
_EXCERPT_CHARS = 200
_CLOSE_GRACE_S = 1.0  # how long a clean close may take before the socket is just dropped
_NUMBER = re.compile(r"\d+(\.\d+)?")


class _Aborted(Exception):
    """abort() closed this request's connection: generate() ends with Finished("aborted")."""


@dataclass(frozen=True)
class _Target:
    """Where requests go, parsed once from base_url."""

    host: str
    port: int
    path: str  # <base path>/chat/completions
    host_header: str
    label: str  # "openai host:port", what error messages name
    tls: ssl.SSLContext | None


def _parse_base_url(base_url: str) -> _Target:
    # Messages quote parts, never the whole URL: it may carry a secret somewhere.
    if any(ch.isspace() or ord(ch) < 32 for ch in base_url):
        raise ValueError("base_url must not contain whitespace or control characters")
    parts = urlsplit(base_url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ValueError(f"base_url must use http or https, not {parts.scheme or 'no'} scheme")
    if parts.username is not None or parts.password is not None:
        raise ValueError("base_url must not contain credentials; pass api_key instead")
    if not parts.hostname:
        raise ValueError("base_url has no host")
    try:
        port = parts.port
    except ValueError:
        raise ValueError("base_url has an invalid port") from None
    if parts.query or parts.fragment:
        raise ValueError("base_url must not have a query or fragment")
    try:
        host = parts.hostname.encode("idna").decode("ascii")
    except UnicodeError:
        raise ValueError("base_url has an invalid host name") from None
    default_port = 443 if scheme == "https" else 80
    port = port or default_port
    shown = f"[{host}]" if ":" in host else host
    return _Target(
        host=host,
        port=port,
        path=parts.path.rstrip("/") + "/chat/completions",
        host_header=shown if port == default_port else f"{shown}:{port}",
        label=f"openai {shown}:{port}",
        tls=ssl.create_default_context() if scheme == "https" else None,
    )


@dataclass(frozen=True)
class _Chunk:
    text: str
    finish_reason: str | None
    usage: tuple[int, int] | None  # prompt_tokens, completion_tokens


def _parse_chunk(data: str) -> _Chunk:
    try:
        obj = json.loads(data)
    except ValueError:
        raise BadStream(f"malformed JSON in stream chunk: {data[:80]!r}") from None
    if not isinstance(obj, dict):
        raise BadStream(f"stream chunk is not an object: {data[:80]!r}")
    if obj.get("error"):
        # Servers report failures that happen mid-generation as an event like this.
        raise BadStream(f"error event in stream: {_error_message(obj)}")
    text, finish_reason, usage = "", None, None
    choices = obj.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        delta = choices[0].get("delta")
        if isinstance(delta, dict) and isinstance(delta.get("content"), str):
            text = delta["content"]
        if isinstance(choices[0].get("finish_reason"), str):
            finish_reason = choices[0]["finish_reason"]
    figures = obj.get("usage")
    if isinstance(figures, dict):
        prompt, completion = figures.get("prompt_tokens"), figures.get("completion_tokens")
        if isinstance(prompt, int) and isinstance(completion, int):
            usage = (prompt, completion)
    return _Chunk(text, finish_reason, usage)


def _error_message(obj: Any) -> str:
    """The human part of an error body: OpenAI's {"error": {"message": ...}} and the shapes
    other compatible servers use."""
    if isinstance(obj, dict):
        error = obj.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return error["message"]
        for value in (error, obj.get("message"), obj.get("detail")):
            if isinstance(value, str):
                return value
    return json.dumps(obj)


def _excerpt(text: str, secret: str | None) -> str:
    with contextlib.suppress(ValueError):  # not JSON: quote the text itself
        text = _error_message(json.loads(text))
    if secret:
        text = text.replace(secret, "***")
    text = " ".join(text.split())
    return text if len(text) <= _EXCERPT_CHARS else text[: _EXCERPT_CHARS - 1] + "…"


def _retry_after_s(value: str | None) -> float | None:
    """Retry-After in seconds; the HTTP-date form is ignored (no provider sends it)."""
    if value is None or not _NUMBER.fullmatch(value.strip()):
        return None
    return float(value)


class _Call:
    """One request's connection and what has come back on it. abort() reaches it by id
    from the engine's table while generate() may be waiting in a read."""

    def __init__(self, target: _Target, *, connect_timeout_s: float, stall_timeout_s: float):
        self.target = target
        self.connect_timeout_s = connect_timeout_s
        self.stall_timeout_s = stall_timeout_s
        self.aborted_at: float | None = None
        self.received = 0  # content deltas handed to the consumer
        self.finish_reason: str | None = None
        self.usage: tuple[int, int] | None = None
        self._opening: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] | None
        self._opening = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._read_error: OSError | None = None
        self._decoder: Decoder = UntilCloseDecoder()
        self._sse = SseParser()
        self._events: deque[str] = deque()
        self._ended = False  # the body is over: no more events than those in _events

    def abort(self) -> None:
        if self.aborted_at is None:
            self.aborted_at = time.time()
        if self._opening is not None and not self._opening.done():
            self._opening.cancel()
        if self._writer is not None:
            self._writer.transport.abort()  # a pending read wakes up at EOF

    def check_aborted(self) -> None:
        if self.aborted_at is not None:
            raise _Aborted

    async def open(self, request: bytes, secret: str | None) -> None:
        """Connects, sends the request and reads the response head; raises unless the
        server answered 200 with an event stream."""
        await self._connect()
        await self._send(request)
        head, rest = await self._read_head()
        if head.status != 200:
            raise await self._status_error(head, rest, secret)
        content_type = head.headers.get("content-type", "text/event-stream")
        if not content_type.lower().startswith("text/event-stream"):
            raise EngineRejected(
                f"{self.target.label}: expected an event stream, got {content_type[:60]!r}"
            )
        self._decoder = decoder_for(head.headers)
        self._take(rest)

    async def next_text(self) -> str | None:
        """The next non-empty content delta; None once the stream says [DONE]."""
        while (data := await self._next_event()) is not None:
            chunk = _parse_chunk(data)
            self.usage = chunk.usage or self.usage
            self.finish_reason = chunk.finish_reason or self.finish_reason
            if chunk.text:
                self.received += 1
                return chunk.text
        return None

    async def close(self) -> None:
        writer, self._writer = self._writer, None
        if writer is None:
            return
        writer.close()
        try:
            async with asyncio.timeout(_CLOSE_GRACE_S):
                await writer.wait_closed()
        except (TimeoutError, OSError):
            writer.transport.abort()  # a TLS peer that never answers close_notify
        except BaseException:
            writer.transport.abort()
            raise

    async def _connect(self) -> None:
        kwargs: dict[str, Any] = {}
        if self.target.tls is not None:
            kwargs = {
                "ssl": self.target.tls,
                "server_hostname": self.target.host,
                "ssl_handshake_timeout": self.connect_timeout_s,
            }
        opening = asyncio.ensure_future(
            asyncio.open_connection(self.target.host, self.target.port, **kwargs)
        )
        self._opening = opening  # abort() cancels it
        try:
            await asyncio.wait({opening}, timeout=self.connect_timeout_s)
        finally:
            if not opening.done():
                opening.cancel()
                await asyncio.wait({opening})  # let it close its half-open socket
            if not opening.cancelled() and opening.exception() is None:
                # Kept even when leaving by cancellation, so close() still closes it.
                self._reader, self._writer = opening.result()
        self.check_aborted()
        if self._writer is not None:
            return
        failure = None if opening.cancelled() else opening.exception()
        if failure is None:
            raise EngineUnavailable(
                f"{self.target.label}: connect timed out after {self.connect_timeout_s:g}s"
            )
        raise EngineUnavailable(f"{self.target.label}: connect failed: {failure}") from failure

    async def _send(self, request: bytes) -> None:
        assert self._writer is not None
        self._writer.write(request)
        try:
            async with asyncio.timeout(self.stall_timeout_s):
                await self._writer.drain()
        except TimeoutError:
            self.check_aborted()
            raise EngineUnavailable(self._stalled("sending the request")) from None
        except OSError as exc:
            self.check_aborted()
            raise EngineUnavailable(f"{self.target.label}: sending failed: {exc}") from exc

    async def _read_some(self, phase: str) -> bytes:
        """Whatever bytes come next; b"" at the end of the connection (or a read error,
        kept in _read_error). Raises _Aborted after abort() and stalls as EngineUnavailable."""
        assert self._reader is not None
        self.check_aborted()
        try:
            async with asyncio.timeout(self.stall_timeout_s):
                data = await self._reader.read(_READ_SIZE)
        except TimeoutError:
            self.check_aborted()
            raise EngineUnavailable(self._stalled(phase)) from None
        except OSError as exc:
            self._read_error, data = exc, b""
        self.check_aborted()
        return data

    def _stalled(self, phase: str) -> str:
        return f"{self.target.label}: stalled: no bytes for {self.stall_timeout_s:g}s {phase}"

    async def _read_head(self) -> tuple[Head, bytes]:
        buf = b""
        while True:
            end = buf.find(b"\r\n\r\n")
            if end >= 0:
                head, buf = parse_head(buf[:end]), buf[end + 4 :]
                if 100 <= head.status < 200:
                    continue  # an interim response; the real one follows
                return head, buf
            if len(buf) > _MAX_HEAD_BYTES:
                raise BadStream("response head too large")
            data = await self._read_some("waiting for the response")
            if not data:
                why = f": {self._read_error}" if self._read_error else ""
                raise EngineUnavailable(
                    f"{self.target.label}: connection closed before a response{why}"
                )
            buf += data

    async def _status_error(self, head: Head, rest: bytes, secret: str | None) -> EngineError:
        text = await self._error_body(head, rest)
        message = f"{self.target.label}: HTTP {head.status}"
        if excerpt := _excerpt(text, secret):
            message += f": {excerpt}"
        if head.status == 429 or head.status >= 500:
            retry = _retry_after_s(head.headers.get("retry-after"))
            return EngineUnavailable(message, retry_after_s=retry, throttled=head.status == 429)
        return EngineRejected(message)

    async def _error_body(self, head: Head, rest: bytes) -> str:
        body = bytearray()
        try:
            self._decoder = decoder_for(head.headers)
            body += self._decoder.feed(rest)
            while not self._decoder.complete and len(body) < _MAX_ERROR_BODY_BYTES:
                data = await self._read_some("reading the error response")
                if not data:
                    break
                body += self._decoder.feed(data)
        except (EngineUnavailable, BadStream):
            pass  # the status says what matters; quote what did arrive
        return body.decode("utf-8", "replace")

    def _take(self, data: bytes) -> None:
        self._events.extend(self._sse.feed(self._decoder.feed(data)))
        if self._decoder.complete:
            self._events.extend(self._sse.finish())
            self._ended = True

    async def _next_event(self) -> str | None:
        """The next event's data; None once the stream says [DONE]."""
        self.check_aborted()  # events may be buffered: none are handed out after abort()
        while not self._events:
            if self._ended:
                why = f": {self._read_error}" if self._read_error else " (no [DONE])"
                raise EngineUnavailable(
                    f"{self.target.label}: stream dropped after {self.received} tokens{why}"
                )
            data = await self._read_some(f"after {self.received} tokens")
            if data:
                self._take(data)
            else:
                self._events.extend(self._sse.finish())
                self._ended = True
        event = self._events.popleft()
        return None if event == "[DONE]" else event


class OpenAIEngine(Engine):
    name = "openai"

    def __init__(
        self,
        *,
        base_url: str,
        model: str,
        api_key: str | None = None,
        connect_timeout_s: float = 10.0,
        stall_timeout_s: float = 30.0,
    ) -> None:
        self._target = _parse_base_url(base_url)
        if not model:
            raise ValueError("model must not be empty")
        if api_key is not None and not (api_key.isascii() and api_key.isprintable()):
            raise ValueError("api_key must be printable ASCII")
        if connect_timeout_s <= 0 or stall_timeout_s <= 0:
            raise ValueError("connect_timeout_s and stall_timeout_s must be positive")
        self.model = model
        self._api_key = api_key or None
        self.connect_timeout_s = connect_timeout_s
        self.stall_timeout_s = stall_timeout_s
        self._calls: dict[str, _Call] = {}

    def __repr__(self) -> str:
        return f"<OpenAIEngine {self._target.label} model={self.model!r}>"

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenDelta | Finished]:
        call = self._register(request.request_id)
        # An estimate, for when the server sends no usage: chat templates and tokenizers
        # make the real count differ.
        prompt_tokens = len(request.prompt.split())
        try:
            try:
                await call.open(self._request_bytes(request), self._api_key)
                while (text := await call.next_text()) is not None:
                    yield TokenDelta(text, tokens=1, at=time.time())
                prompt_tokens, completion_tokens = call.usage or (prompt_tokens, call.received)
                reason: FinishReason = "length" if call.finish_reason == "length" else "stop"
                finished = Finished(reason, prompt_tokens, completion_tokens, at=time.time())
            except _Aborted:
                assert call.aborted_at is not None
                finished = Finished("aborted", prompt_tokens, call.received, at=call.aborted_at)
            except BadStream as exc:
                raise self._unavailable(call, str(exc)) from None
        finally:
            # Before the last yield, so a consumer that stops at Finished leaves nothing open.
            if self._calls.get(request.request_id) is call:
                del self._calls[request.request_id]
            await call.close()
        yield finished

    async def abort(self, request_id: str) -> None:
        call = self._calls.get(request_id)
        if call is not None:
            call.abort()

    async def close(self) -> None:
        for request_id in list(self._calls):
            await self.abort(request_id)

    def open_requests(self) -> list[str]:
        """Ids of the requests that hold a connection now (for tests and metrics)."""
        return list(self._calls)

    def _register(self, request_id: str) -> _Call:
        if request_id in self._calls:
            raise ValueError(f"request {request_id!r} is already streaming")
        call = _Call(
            self._target,
            connect_timeout_s=self.connect_timeout_s,
            stall_timeout_s=self.stall_timeout_s,
        )
        self._calls[request_id] = call
        return call

    def _unavailable(self, call: _Call, problem: str) -> EngineUnavailable:
        detail = _excerpt(problem, self._api_key)
        return EngineUnavailable(f"{self._target.label}: after {call.received} tokens: {detail}")

    def _request_bytes(self, request: GenerationRequest) -> bytes:
        body = json.dumps(
            {
                "model": self.model,
                "messages": [{"role": "user", "content": request.prompt}],
                "max_tokens": request.max_tokens,
                "temperature": request.temperature,
                "stream": True,
                "stream_options": {"include_usage": True},
                **request.extra,
            },
            separators=(",", ":"),
        ).encode()  # ensure_ascii (the default) keeps the body ASCII whatever the prompt
        lines = [
            f"POST {self._target.path} HTTP/1.1",
            f"Host: {self._target.host_header}",
            "Content-Type: application/json",
            "Accept: text/event-stream",
            f"Content-Length: {len(body)}",
            "Connection: close",
            "User-Agent: sluice-openai-engine",
        ]
        if self._api_key:
            lines.append(f"Authorization: Bearer {self._api_key}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + body
