"""A loopback HTTP service that stands in for an external API with idempotency keys (as
Stripe's API does): the first request with a key is performed and its answer stored; a
repeat gets the stored answer and is counted as a deduplicated replay, not performed again.
Tests read `performed` to prove each effect happened once.

Paths choose the behaviour: `/ok` answers 200; `/fail/<status>` answers that status;
anything under `/flaky/` answers 503 to the first `flaky_failures` requests of each key.
`broken` makes every request answer 400 until cleared (a dependency that needs a fix).
"""

import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class EffectService:
    def __init__(self, *, delay_s: float = 0.0, flaky_failures: int = 1) -> None:
        self.delay_s = delay_s
        self.flaky_failures = flaky_failures
        self.broken: set[str] = set()  # path suffixes that answer 400 for now
        self.lock = threading.Lock()
        self.performed: Counter[str] = Counter()
        self.answers: dict[str, bytes] = {}
        self.replays = 0
        self.requests = 0
        self.failed_attempts: Counter[str] = Counter()
        self.without_key = 0
        self.bodies: dict[str, Any] = {}
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> "EffectService":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)

    def _answer(self, path: str, key: str, body: Any) -> tuple[int, bytes]:
        with self.lock:
            self.requests += 1
            if not key:
                self.without_key += 1
                return 400, b'{"error": "Idempotency-Key required"}'
            if key in self.answers:
                self.replays += 1
                return 200, self.answers[key]
            if path.startswith("/fail/"):
                return int(path.rsplit("/", 1)[1]), b'{"error": "as asked"}'
            if any(path.endswith(suffix) for suffix in self.broken):
                return 400, b'{"error": "broken until fixed"}'
            if path.startswith("/flaky/") and self.failed_attempts[key] < self.flaky_failures:
                self.failed_attempts[key] += 1
                return 503, b'{"error": "try again"}'
            self.performed[key] += 1
            self.bodies[key] = body
            answer = json.dumps({"ok": True, "n": len(self.performed), "echo": body}).encode()
            self.answers[key] = answer
            return 200, answer

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        service = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw else None
                if service.delay_s:
                    time.sleep(service.delay_s)  # a slow API widens the crash window
                status, answer = service._answer(
                    self.path, self.headers.get("Idempotency-Key", ""), body
                )
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(answer)))
                    self.end_headers()
                    self.wfile.write(answer)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the caller was killed mid-call: what chaos tests are for

            do_PUT = do_POST

            def log_message(self, format: str, *args: Any) -> None:
                pass  # keep test output quiet

        return Handler
