"""Brings up what a benchmark needs, as `make run` does, in a folder of its own:
embedded PostgreSQL and Redis, migrations, and real Celery worker processes."""

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sluice import embedded, processes
from sluice.embedded_paths import BASE_DIR


@contextmanager
def services(name: str) -> Iterator[Path]:
    root = BASE_DIR / "var" / f"bench-{name}-{os.getpid()}"
    (root / "redis").mkdir(parents=True, exist_ok=True)
    port = embedded.free_port()
    redis = embedded.start_redis(root / "redis", port)
    try:
        os.environ["REDIS_URL"] = f"redis://127.0.0.1:{port}/0"
        os.environ["DATABASE_URL"] = embedded.start_postgres(root / "pg")
        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "sluice.settings")
        import django
        from django.core.management import call_command

        django.setup()
        call_command("migrate", verbosity=0)
        yield root
    finally:
        embedded.stop_redis(redis)
        embedded.stop_postgres(root / "pg")
        shutil.rmtree(root, ignore_errors=True)


def start_worker(
    root: Path,
    name: str,
    queues: list[str],
    extra: list[str],
    *,
    concurrency: int = 2,
    pool: str = "prefork",
    env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """A worker (prefork unless `pool` says otherwise; a GPU worker runs threads), with
    `env` over this process's environment, returned once it says it is ready."""
    argv = processes.worker_argv(queues, name, pool=pool, concurrency=concurrency) + extra
    log = root / f"{name}.log"
    proc = processes.spawn(argv, env={**os.environ, **(env or {})}, log_path=log)
    deadline = time.monotonic() + 60
    while " ready." not in (log.read_text() if log.exists() else ""):
        if time.monotonic() > deadline or proc.poll() is not None:
            processes.stop_all([proc])
            raise RuntimeError(f"worker {name} did not start; see {log}")
        time.sleep(0.1)
    return proc


@contextmanager
def worker(
    root: Path,
    name: str,
    queues: list[str],
    extra: list[str],
    *,
    concurrency: int = 2,
    pool: str = "prefork",
    env: dict[str, str] | None = None,
) -> Iterator[None]:
    proc = start_worker(root, name, queues, extra, concurrency=concurrency, pool=pool, env=env)
    try:
        yield
    finally:
        processes.stop_all([proc])


@contextmanager
def beat(root: Path) -> Iterator[None]:
    """The sweeper's clock: expired leases are found only while beat runs."""
    proc = processes.spawn(
        processes.beat_argv(root / "celerybeat-schedule"),
        env=dict(os.environ),
        log_path=root / "beat.log",
    )
    try:
        yield
    finally:
        processes.stop_all([proc])
