"""Pytest plugin (loaded with -p, before pytest-django reads settings): starts a real
PostgreSQL and Redis for the test session and points the settings at them.

Each test session gets its own folder under var/test-services (apart from `make run`'s
var/pg), so a running platform and two test sessions at once never share data; it is
removed when the session ends.
"""

import logging
import os
import shutil
from pathlib import Path

import pytest

from sluice import embedded
from sluice.embedded_paths import BASE_DIR

SERVICES_DIR = BASE_DIR / "var" / "test-services" / f"session-{os.getpid()}"

# Short leases and a busy sweeper, so crash recovery happens within seconds in tests;
# a fast simulated engine so LLM stages do not dominate the suite's time.
TEST_ENV = {
    "SLUICE_STEP_LEASE_S": "3",
    "SLUICE_SWEEP_INTERVAL_S": "0.5",
    "SLUICE_REQUEUE_AFTER_S": "5",
    "SLUICE_SIM_TTFT_MS": "20",
    "SLUICE_SIM_TOKENS_PER_S": "400",
}

_redis: object = None


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config) -> None:
    global _redis
    if early_config.known_args_namespace.help or early_config.known_args_namespace.version:
        return
    os.environ.update(TEST_ENV)
    redis_dir = SERVICES_DIR / "redis"
    redis_dir.mkdir(parents=True, exist_ok=True)
    port = embedded.free_port()
    _redis = embedded.start_redis(redis_dir, port)
    os.environ["REDIS_URL"] = f"redis://127.0.0.1:{port}/0"
    os.environ["DATABASE_URL"] = embedded.start_postgres(pg_data_dir())


def pg_data_dir() -> Path:
    return SERVICES_DIR / "pg"


def pytest_unconfigure(config: pytest.Config) -> None:
    # pgserver logs from an atexit hook after pytest closed the captured streams.
    logging.getLogger("pgserver").disabled = True
    if _redis is not None:
        embedded.stop_redis(_redis)  # type: ignore[arg-type]
        embedded.stop_postgres(pg_data_dir())
        shutil.rmtree(SERVICES_DIR, ignore_errors=True)
