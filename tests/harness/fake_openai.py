"""A fake OpenAI-compatible chat-completions server on loopback, for tests and benchmarks of
the OpenAI engine. It speaks the real protocol: `POST /v1/chat/completions` with
`"stream": true` answers 200 with a chunked `text/event-stream` of OpenAI-shaped chunks
(a role chunk, one chunk per word, a chunk with finish_reason, a usage chunk when
`stream_options.include_usage`, then `data: [DONE]`).

The answer is a pure function of the prompt (see `tokens_for`), paced by `ttft_s` and
`tokens_per_s`. `faults` scripts per-request misbehaviour: an HTTP error status, a stall or
a dropped connection after N tokens. Every request is recorded in `streams`, with when the
client hung up, so tests can prove an abort reached the server and nothing is left running.

Between tokens a handler waits on its socket rather than sleeping, so it sees a client that
hangs up at once (EOF or reset), not only at the next write.
"""

import hashlib
import json
import random
import select
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_VOCABULARY = (
    "stream graph token batch window event lineage budget worker queue signal model river "
    "sluice gate flow current channel harbor summary insight detail result answer pattern "
    "careful quick steady clear bright measured durable exact honest"
)
_WORDS = _VOCABULARY.split()

# Chat templates wrap each message in special tokens, so a real server's prompt_tokens is
# more than the words in the prompt; the fake adds this many, which also lets tests tell
# its usage figures from the engine's word-count estimate.
TEMPLATE_TOKENS = 8


@dataclass(frozen=True)
class Fault:
    """How one request misbehaves. `status` answers that HTTP status with an OpenAI-style
    error body (and `retry_after` as the Retry-After header); `stall_headers` sends nothing
    at all; `stall_after` sends N tokens and then nothing until the client leaves;
    `drop_after` sends N tokens and closes the connection with no terminating chunk."""

    status: int | None = None
    retry_after: str | None = None
    message: str | None = None
    stall_headers: bool = False
    stall_after: int | None = None
    drop_after: int | None = None


# A list applies its faults to requests in arrival order (None: behave); a callable gets the
# request's index and parsed body.
FaultScript = Sequence[Fault | None] | Callable[[int, Any], Fault | None]


@dataclass
class StreamRecord:
    index: int
    path: str
    body: Any  # the parsed JSON request body (None if it was not JSON)
    authorization: str | None
    started_at: float
    status: int = 200
    tokens_sent: int = 0  # content chunks written without error
    client_closed_at: float | None = None  # when the server saw the client hang up
    completed: bool = False  # the stream ended with [DONE] and the terminating chunk
    active: bool = True  # the handler is still writing (or stalling) this response
    ended_at: float | None = None  # when the handler finished with it
    # Taken just before the response's last bytes were written: the client cannot have had
    # the whole answer (and started its next call) before this, whereas ended_at, taken
    # after the write, may come later than that on a busy machine.
    last_bytes_at: float | None = None


class FakeOpenAI:
    def __init__(
        self,
        *,
        tokens_per_s: float = 200.0,
        ttft_s: float = 0.0,
        answer_words: int = 12,
        faults: FaultScript = (),
        stall_s: float = 30.0,
    ) -> None:
        self.tokens_per_s = tokens_per_s  # 0 or less: no pause between tokens
        self.ttft_s = ttft_s
        self.answer_words = answer_words  # an answer's length unless max_tokens cuts it
        self.faults = faults
        self.stall_s = stall_s  # the longest a stall lasts if the client stays
        self.streams: list[StreamRecord] = []
        self.lock = threading.Lock()
        # stop() writes a byte here; every waiting handler selects on it and gives up.
        self._wake_r, self._wake_w = socket.socketpair()
        self.stopping = threading.Event()
        self.server = _Server(self)
        self._thread = threading.Thread(
            target=self.server.serve_forever,
            kwargs={"poll_interval": 0.05},  # so stop() returns promptly
            name="fake-openai",
            daemon=True,
        )

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def start(self) -> "FakeOpenAI":
        self._thread.start()
        return self

    def stop(self) -> None:
        if self.stopping.is_set():
            return
        self.stopping.set()
        self._wake_w.send(b"x")
        if self._thread.is_alive():
            self.server.shutdown()
            self._thread.join()
        self.server.server_close()  # joins the handler threads
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> "FakeOpenAI":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def active_streams(self) -> int:
        with self.lock:
            return sum(record.active for record in self.streams)

    def tokens_for(self, prompt: str, max_tokens: int | None = None) -> tuple[list[str], str]:
        """The answer's tokens for this prompt and its finish_reason: same prompt, same words;
        "length" when max_tokens cut it short."""
        seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big")
        rng = random.Random(seed)
        words = [rng.choice(_WORDS) for _ in range(self.answer_words)]
        tokens = [word.capitalize() if i == 0 else " " + word for i, word in enumerate(words)]
        if max_tokens is not None and max_tokens < len(tokens):
            return tokens[:max_tokens], "length"
        return tokens, "stop"

    def text_for(self, prompt: str, max_tokens: int | None = None) -> str:
        return "".join(self.tokens_for(prompt, max_tokens)[0])

    def _begin(self, path: str, body: Any, authorization: str | None) -> StreamRecord:
        with self.lock:
            record = StreamRecord(len(self.streams), path, body, authorization, time.time())
            self.streams.append(record)
            return record

    def _fault_for(self, record: StreamRecord) -> Fault:
        faults = self.faults
        if callable(faults):
            fault = faults(record.index, record.body)
        else:
            fault = faults[record.index] if record.index < len(faults) else None
        return fault or Fault()


class _Server(ThreadingHTTPServer):
    # Daemon threads cannot keep the interpreter alive; server_close() still joins them.
    daemon_threads = True
    request_queue_size = 1024  # benchmarks open many streams at once; the default is 5

    def __init__(self, fake: FakeOpenAI) -> None:
        self.fake = fake
        super().__init__(("127.0.0.1", 0), _Handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 10  # a client that never sends its request cannot hold stop() up for long
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass  # tests read records, not logs

    def do_POST(self) -> None:
        self.close_connection = True  # one request per connection, as the engine does
        fake = self.server.fake
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        record = fake._begin(self.path, body, self.headers.get("Authorization"))
        try:
            self._answer(fake, record)
        except OSError:
            self.client_left(record)  # a write of the head or an error body failed
        finally:
            with fake.lock:
                record.active = False
                record.ended_at = time.time()

    def _answer(self, fake: FakeOpenAI, record: StreamRecord) -> None:
        fault = fake._fault_for(record)
        if self.path != "/v1/chat/completions":
            self._error(record, 404, f"Unknown path {self.path}", None)
        elif not isinstance(record.body, dict) or not isinstance(record.body.get("messages"), list):
            self._error(record, 400, "'messages' is a required property", None)
        elif fault.status is not None:
            message = fault.message or f"injected HTTP {fault.status}"
            self._error(record, fault.status, message, fault.retry_after)
        elif fault.stall_headers:
            self.pause(record, fake.stall_s)
        elif record.body.get("stream"):
            _Streamer(self, fake, record, fault).run()
        else:
            self._complete(fake, record)

    def _error(self, record: StreamRecord, status: int, message: str, retry: str | None) -> None:
        record.status = status
        kind = "invalid_request_error" if status < 500 else "server_error"
        payload = {"error": {"message": message, "type": kind, "param": None, "code": None}}
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if retry is not None:
            self.send_header("Retry-After", retry)
        self.send_header("Connection", "close")
        self.end_headers()
        record.last_bytes_at = time.time()
        self.wfile.write(data)

    def _complete(self, fake: FakeOpenAI, record: StreamRecord) -> None:
        """A non-streaming request: the whole answer in one chat.completion object."""
        prompt, max_tokens = _prompt(record.body), record.body.get("max_tokens")
        tokens, reason = fake.tokens_for(prompt, max_tokens)
        message = {"role": "assistant", "content": "".join(tokens)}
        payload = {
            "id": f"chatcmpl-fake-{record.index}",
            "object": "chat.completion",
            "created": int(record.started_at),
            "model": record.body.get("model"),
            "choices": [{"index": 0, "message": message, "finish_reason": reason}],
            "usage": _usage(prompt, len(tokens)),
        }
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        record.last_bytes_at = time.time()
        self.wfile.write(data)
        record.tokens_sent, record.completed = len(tokens), True

    def pause(self, record: StreamRecord, seconds: float) -> bool:
        """Pauses up to `seconds`; False as soon as the client hangs up or the fake stops."""
        deadline = time.monotonic() + seconds
        # poll, not select: benchmarks hold more than select's 1024 descriptors.
        poller = select.poll()
        poller.register(self.connection, select.POLLIN)
        poller.register(self.server.fake._wake_r, select.POLLIN)
        while (left := deadline - time.monotonic()) > 0:
            ready = poller.poll(left * 1000)
            if self.server.fake.stopping.is_set():
                return False
            if ready and self._peer_gone():
                self.client_left(record)
                return False
        return True

    def _peer_gone(self) -> bool:
        try:
            data = self.connection.recv(4096, socket.MSG_PEEK)
        except OSError:
            return True  # reset
        if data:
            self.connection.recv(len(data))  # stray bytes after the request: discard them
        return not data

    def client_left(self, record: StreamRecord) -> None:
        with self.server.fake.lock:
            if record.client_closed_at is None:
                record.client_closed_at = time.time()

    def write_event(self, record: StreamRecord, payload: object) -> bool:
        """One SSE event as one HTTP chunk in one write; False if the client has gone."""
        text = payload if isinstance(payload, str) else json.dumps(payload)
        data = f"data: {text}\n\n".encode()
        try:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        except OSError:
            self.client_left(record)
            return False
        return True


class _Streamer:
    """Writes one streamed answer, applying the request's fault."""

    def __init__(
        self, handler: _Handler, fake: FakeOpenAI, record: StreamRecord, fault: Fault
    ) -> None:
        self.handler, self.fake, self.record, self.fault = handler, fake, record, fault
        body = record.body
        self.prompt = _prompt(body)
        self.tokens, self.reason = fake.tokens_for(self.prompt, body.get("max_tokens"))
        options = body.get("stream_options")
        self.include_usage = isinstance(options, dict) and bool(options.get("include_usage"))

    def run(self) -> None:
        handler = self.handler
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        handler.send_header("Cache-Control", "no-cache")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.send_header("Connection", "close")
        handler.end_headers()
        if not handler.pause(self.record, self.fake.ttft_s):
            return
        if not self._send({"role": "assistant", "content": ""}, None):
            return
        for i, token in enumerate(self.tokens):
            if self._interrupted(i) or (i and not handler.pause(self.record, self._interval())):
                return
            if not self._send({"content": token}, None):
                return
            with self.fake.lock:
                self.record.tokens_sent += 1
        if self._interrupted(len(self.tokens)) or not self._send({}, self.reason):
            return
        if self.include_usage and not self._write(
            self._chunk([], _usage(self.prompt, len(self.tokens)))
        ):
            return
        if self._write("[DONE]"):
            self.record.last_bytes_at = time.time()
            handler.wfile.write(b"0\r\n\r\n")
            self.record.completed = True

    def _interval(self) -> float:
        return 1.0 / self.fake.tokens_per_s if self.fake.tokens_per_s > 0 else 0.0

    def _interrupted(self, sent: int) -> bool:
        """Applies a stall or drop due after `sent` tokens; True if it ended the stream."""
        if self.fault.stall_after == sent:
            self.handler.pause(self.record, self.fake.stall_s)
            return True
        if self.fault.drop_after == sent:
            # FIN with no terminating chunk and no [DONE]: a crashed server or proxy.
            self.handler.connection.shutdown(socket.SHUT_RDWR)
            return True
        return False

    def _send(self, delta: dict[str, str], finish_reason: str | None) -> bool:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return self._write(self._chunk([choice], None))

    def _chunk(self, choices: list[Any], usage: dict[str, int] | None) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": f"chatcmpl-fake-{self.record.index}",
            "object": "chat.completion.chunk",
            "created": int(self.record.started_at),
            "model": self.record.body.get("model"),
            "choices": choices,
        }
        if self.include_usage:
            chunk["usage"] = usage  # null on every chunk but the last, as OpenAI sends it
        return chunk

    def _write(self, payload: object) -> bool:
        return self.handler.write_event(self.record, payload)


def _prompt(body: dict[str, Any]) -> str:
    contents = [m.get("content") for m in body["messages"] if isinstance(m, dict)]
    return "\n".join(content for content in contents if isinstance(content, str))


def _usage(prompt: str, completion_tokens: int) -> dict[str, int]:
    prompt_tokens = len(prompt.split()) + TEMPLATE_TOKENS
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
