"""Pytest plugin (loaded with -p, before pytest-django reads settings): starts a real
PostgreSQL, Redis and (with Java and Maven) Kafka for the test session and points the
settings at them.

Each test session gets its own folder under var/test-services (apart from `make run`'s
var/pg), so a running platform and two test sessions at once never share data; it is
removed when the session ends.
"""

import logging
import os
import shutil
import threading
from pathlib import Path

import pytest

from sluice import embedded, kafka_broker
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
    # Fixture users hashed in microseconds (sluice/settings.py); servers and workers the
    # tests start inherit it, so a browser test still signs in.
    "SLUICE_PASSWORD_HASHING": "insecure-fast-for-tests",
}

KAFKA_STOP_TIMEOUT_S = 60.0

_redis: object = None


class KafkaUnavailable(LookupError):
    """No broker for this session; the message says why."""


class _TestBroker(threading.Thread):
    """Fetches the jars and starts the broker while the first tests run, then holds it until
    the session ends. The thread must live as long as the broker: Linux sends the
    die-with-parent signal when the *thread* that started a child ends, not the process."""

    def __init__(self, port: int, controller_port: int) -> None:
        super().__init__(name="test-kafka-broker", daemon=True)
        self.port = port
        self.controller_port = controller_port
        self.work_dir = SERVICES_DIR / "kafka"
        self.error: Exception | None = None
        self._settled = threading.Event()  # serving, or failed
        self._stopping = threading.Event()

    def run(self) -> None:
        proc = None
        try:
            libs_dir = kafka_broker.ensure_jars(kafka_broker.default_libs_dir())
            proc = kafka_broker.start_broker(
                self.work_dir, self.port, self.controller_port, libs_dir, check=self._check
            )
        except Exception as exc:  # handed to the tests that wait for Kafka
            self.error = exc
        finally:
            self._settled.set()
        if proc is not None:
            self._stopping.wait()
            kafka_broker.stop_broker(proc)

    def _check(self) -> None:
        if self._stopping.is_set():
            raise RuntimeError("the test session ended before Kafka was ready")

    def wait(self, timeout: float) -> str:
        if not self._settled.wait(timeout):
            raise RuntimeError(
                f"Kafka not ready after {timeout:.0f} s; see {self.work_dir / 'kafka.log'}"
            )
        if self.error is not None:
            raise RuntimeError(f"the test Kafka broker did not start: {self.error}")
        return kafka_broker.bootstrap_for(self.port)

    def stop(self) -> None:
        self._stopping.set()
        self.join(KAFKA_STOP_TIMEOUT_S)


_kafka: _TestBroker | None = None
_kafka_off_reason = ""


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
    _start_kafka()


def _start_kafka() -> None:
    """The broker takes seconds to fetch and start: it does so in a thread while the first
    tests run. Its address goes into the environment now, before settings load."""
    global _kafka, _kafka_off_reason
    if os.environ.get("SLUICE_KAFKA", "").lower() == "off":
        _kafka_off_reason = "SLUICE_KAFKA=off: Kafka tests need a broker"
        os.environ.pop("KAFKA_BOOTSTRAP_SERVERS", None)  # off means off, for Django too
    elif os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        return  # a cluster given by the environment
    elif not kafka_broker.java_available():
        _kafka_off_reason = "no Java/Maven: Kafka tests need a broker"
    else:
        _kafka = _TestBroker(embedded.free_port(), embedded.free_port())
        os.environ["KAFKA_BOOTSTRAP_SERVERS"] = kafka_broker.bootstrap_for(_kafka.port)
        _kafka.start()


def wait_for_kafka(timeout: float = 180) -> str:
    """The session's Kafka bootstrap servers once the broker answers. Raises
    KafkaUnavailable when there is none, RuntimeError when it failed to start."""
    if _kafka is not None:
        return _kafka.wait(timeout)
    configured = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if configured and not _kafka_off_reason:
        return configured
    raise KafkaUnavailable(_kafka_off_reason or "no Kafka broker for this session")


def pg_data_dir() -> Path:
    return SERVICES_DIR / "pg"


def pytest_unconfigure(config: pytest.Config) -> None:
    # pgserver logs from an atexit hook after pytest closed the captured streams.
    logging.getLogger("pgserver").disabled = True
    if _kafka is not None:
        _kafka.stop()
    if _redis is not None:
        embedded.stop_redis(_redis)  # type: ignore[arg-type]
        embedded.stop_postgres(pg_data_dir())
        shutil.rmtree(SERVICES_DIR, ignore_errors=True)
