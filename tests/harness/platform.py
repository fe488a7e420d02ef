"""Real Celery worker and beat processes, and the ASGI server, for integration tests, pointed
at the test database. No eager mode: messages go through Redis to separate processes."""

import os
import signal
import subprocess
import time
from pathlib import Path

from django.db import connection

from sluice import embedded, processes
from sluice.embedded_paths import BASE_DIR, embedded_database_url
from tests.harness.plugin import SERVICES_DIR, pg_data_dir

LOG_DIR = BASE_DIR / "var" / "test-logs" / f"session-{os.getpid()}"


class Platform:
    """Starts workers, beat and the web server on demand; stops every one of them at teardown."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.procs: list[subprocess.Popen[bytes]] = []
        self.web_procs: dict[str, subprocess.Popen[bytes]] = {}

    def env(self, **overrides: str) -> dict[str, str]:
        env = {**os.environ, **overrides}
        # The browser tests allow this in their own process (Playwright's sync API keeps an
        # event loop running); the server and workers must keep Django's check.
        env.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
        # pytest-django has switched this process to the test database; so must the workers.
        env["DATABASE_URL"] = embedded_database_url(pg_data_dir(), connection.settings_dict["NAME"])
        return env

    def log_path(self, name: str) -> Path:
        return LOG_DIR / f"{self.label}-{name}.log"

    def start_worker(
        self,
        name: str,
        queues: list[str],
        *,
        pool: str = "threads",
        concurrency: int = 4,
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        argv = processes.worker_argv(queues, name, pool=pool, concurrency=concurrency)
        proc = processes.spawn(argv, env=self.env(**(env or {})), log_path=self.log_path(name))
        self.procs.append(proc)
        self._wait_ready(name)
        return proc

    def start_kafka_worker(
        self, name: str = "kafka", *, member: str | None = None, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """The Kafka worker `make run` runs (`manage.py kafka_worker`), once it is looping.
        `member`: the worker's name in its groups, when a replacement is to take over a
        killed worker's (else its own)."""
        path = self.log_path(name)
        member = member or f"{name}@{self.label}"
        argv = processes.kafka_worker_argv(member)
        proc = processes.spawn(argv, env=self.env(**(env or {})), log_path=path)
        self.procs.append(proc)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"kafka worker {name} exited; see {path}")
            if path.exists() and f"kafka worker {member}: started" in path.read_text():
                return proc
            time.sleep(0.1)
        raise RuntimeError(f"kafka worker {name} not started after 60 s; see {path}")

    def start_beat(
        self, name: str = "beat", *, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Beat; a second one needs another `name` (each keeps its own schedule file)."""
        suffix = "" if name == "beat" else f"-{name}"
        schedule = SERVICES_DIR / f"beat-{self.label}{suffix}"
        proc = processes.spawn(
            processes.beat_argv(schedule), env=self.env(**(env or {})), log_path=self.log_path(name)
        )
        self.procs.append(proc)
        return proc

    def start_web(
        self, *, env: dict[str, str] | None = None, workers: int = 1, name: str = "web"
    ) -> str:
        """The ASGI server `make run` runs, on a free port; its base URL once it answers.
        `workers` above 1: uvicorn's supervisor and that many worker processes on the port.
        `web_procs[url]` is the process (the supervisor, with workers), e.g. to kill it."""
        port = embedded.free_port()
        log_path = self.log_path(name)
        proc = processes.spawn(
            processes.asgi_argv(port, workers=workers),
            env=self.env(**(env or {})),
            log_path=log_path,
        )
        self.procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        self.web_procs[url] = proc
        processes.wait_until_serving(f"{url}/accounts/login/", proc, log_path)
        return url

    def _wait_ready(self, name: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        path = self.log_path(name)
        while time.monotonic() < deadline:
            if path.exists() and f"{name}@" in path.read_text() and " ready." in path.read_text():
                return
            time.sleep(0.2)
        raise RuntimeError(f"worker {name} not ready after {timeout}s; see {path}")

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL the worker and its pool children at once: a crash, not a shutdown."""
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

    def stop(self) -> None:
        processes.stop_all(self.procs)
        self.procs.clear()
        self.web_procs.clear()
