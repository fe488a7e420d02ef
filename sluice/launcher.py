"""`make run`: start Sluice and everything it needs on one machine, stop it all on Ctrl-C.

Order: embedded PostgreSQL and Redis (unless DATABASE_URL / REDIS_URL point elsewhere), a
Kafka broker (unless KAFKA_BOOTSTRAP_SERVERS points elsewhere, SLUICE_KAFKA=off, or there is
no Java), migrate, seed the demo tenant, then the ASGI server, the Celery workers, beat and
the Kafka worker. If any of them exits on its own, everything stops: a half-running
platform hides the failure.

No Django imports: Django runs in the children, configured by the environment built here.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from sluice import embedded, embedded_paths, kafka_broker, processes
from sluice.env import env_int
from workers.queues import CPU_WORKER_QUEUES

HTTP_WAIT_S = 60.0
DEFAULT_KAFKA_PORT = 9092
DEFAULT_KAFKA_CONTROLLER_PORT = 9093
POLL_S = 0.2


class LaunchError(Exception):
    """A start-up step failed; the message says which and where to look."""


@dataclass
class _Child:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path | None


@dataclass
class _Launch:
    """What this launcher started, so shutdown stops exactly that, in reverse order."""

    var_dir: Path
    postgres_dir: Path | None = None
    redis: subprocess.Popen[bytes] | None = None
    kafka: subprocess.Popen[bytes] | None = None
    # Whether the children get a Kafka (ours or the environment's) and a Kafka worker.
    kafka_on: bool = False
    children: list[_Child] = field(default_factory=list)


class _StopSignal:
    """Set by SIGINT/SIGTERM. A flag polled by the waits below, not an exception raised
    from the handler: an exception could land in the middle of starting PostgreSQL and
    leave a server that nobody stops."""

    received: signal.Signals | None = None

    @classmethod
    def handle(cls, signum: int, _frame: FrameType | None) -> None:
        if cls.received is None:
            cls.received = signal.Signals(signum)

    @classmethod
    def check(cls) -> None:
        if cls.received is not None:
            raise _Stopped


class _Stopped(Exception):
    pass


def _say(message: str) -> None:
    print(message, flush=True)


def main() -> int:
    processes.set_child_subreaper()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _StopSignal.handle)
    launch = _Launch(var_dir=embedded_paths.var_dir().resolve())
    try:
        _run(launch)
    except _Stopped:
        received = _StopSignal.received
        _say(f"\nStopping Sluice ({received.name if received else 'signal'})...")
        return 0
    except LaunchError as exc:
        _say(f"Sluice could not start: {exc}")
        return 1
    finally:
        _shutdown(launch)
    return 1  # _run returns only when a child exited on its own


def _run(launch: _Launch) -> None:
    port = _env_int("PORT", 8000)
    launch.var_dir.mkdir(parents=True, exist_ok=True)
    log_dir = launch.var_dir / "log"
    env = _start_services(launch)
    _StopSignal.check()
    _prepare_database(env, log_dir)
    _start_children(launch, env, port, log_dir)
    _say(f"Logs: {log_dir}/<name>.log ({', '.join(c.name for c in launch.children)})")
    _wait_until_serving(launch, f"http://127.0.0.1:{port}/accounts/login/")
    _say(f"Sluice is running at http://127.0.0.1:{port}/ (logs in {log_dir}); Ctrl-C stops it.")
    _supervise(launch)


def _start_services(launch: _Launch) -> dict[str, str]:
    """Start the embedded PostgreSQL and Redis that the environment does not replace;
    return the environment for the children."""
    env = dict(os.environ)
    # Absolute, so children (cwd = the checkout) agree with us on a relative SLUICE_VAR_DIR.
    env["SLUICE_VAR_DIR"] = str(launch.var_dir)
    env["PYTHONUNBUFFERED"] = "1"  # logs reach var/log/ as they are written
    if not env.get("DATABASE_URL"):
        launch.postgres_dir = embedded_paths.postgres_data_dir(launch.var_dir)
        _say(f"Starting PostgreSQL in {launch.postgres_dir} ...")
        try:
            env["DATABASE_URL"] = embedded.start_postgres(launch.postgres_dir)
        except (RuntimeError, subprocess.SubprocessError) as exc:
            log = launch.postgres_dir / "log"
            raise LaunchError(f"PostgreSQL did not start ({exc}); see {log}") from None
    if not env.get("REDIS_URL"):
        port = _env_int("SLUICE_REDIS_PORT", embedded_paths.DEFAULT_REDIS_PORT)
        _say(f"Starting Redis on 127.0.0.1:{port} ...")
        try:
            launch.redis = embedded.start_redis(launch.var_dir / "redis", port)
        except RuntimeError as exc:
            raise LaunchError(f"{exc}\nSet SLUICE_REDIS_PORT to use another port.") from None
        env["REDIS_URL"] = f"redis://127.0.0.1:{port}/0"
    _start_kafka(launch, env)
    return env


def _start_kafka(launch: _Launch, env: dict[str, str]) -> None:
    """Start the broker unless KAFKA_BOOTSTRAP_SERVERS names one, Kafka is switched off, or
    Java is missing; the platform runs without Kafka, but streams cannot read from it."""
    if env.get("SLUICE_KAFKA", "").lower() == "off":
        env.pop("KAFKA_BOOTSTRAP_SERVERS", None)
        _say("Kafka is off (SLUICE_KAFKA=off): no broker, no Kafka worker.")
        return
    if env.get("KAFKA_BOOTSTRAP_SERVERS"):
        launch.kafka_on = True
        return
    if not kafka_broker.java_available():
        _say(
            "Kafka is off: its broker needs Java and Maven (apt-get install default-jre-headless"
            " maven), or set KAFKA_BOOTSTRAP_SERVERS. Streams cannot read from Kafka until then."
        )
        return
    port = _env_int("SLUICE_KAFKA_PORT", DEFAULT_KAFKA_PORT)
    controller_port = _env_int("SLUICE_KAFKA_CONTROLLER_PORT", DEFAULT_KAFKA_CONTROLLER_PORT)
    launch.kafka = _start_broker(launch, port, controller_port)
    env["KAFKA_BOOTSTRAP_SERVERS"] = kafka_broker.bootstrap_for(port)
    launch.kafka_on = True


def _start_broker(launch: _Launch, port: int, controller_port: int) -> subprocess.Popen[bytes]:
    libs_dir = kafka_broker.default_libs_dir()
    work_dir = launch.var_dir / "kafka" / "broker"
    try:
        if not kafka_broker.jars_ready(libs_dir):
            _say(f"Fetching Kafka jars into {libs_dir} (once) ...")
        kafka_broker.ensure_jars(libs_dir)
        _say(f"Starting Kafka on 127.0.0.1:{port} ...")
        return kafka_broker.start_broker(
            work_dir, port, controller_port, libs_dir, check=_StopSignal.check
        )
    except (RuntimeError, subprocess.SubprocessError) as exc:
        _StopSignal.check()  # Ctrl-C reaches Maven too: then this is a stop, not a failure
        raise LaunchError(
            f"{exc}\nSet SLUICE_KAFKA_PORT / SLUICE_KAFKA_CONTROLLER_PORT to use other ports,"
            " or SLUICE_KAFKA=off to run without Kafka."
        ) from None


def _prepare_database(env: dict[str, str], log_dir: Path) -> None:
    _say("Applying migrations ...")
    migrate_log = log_dir / "migrate.log"
    _run_to_end(
        "manage.py migrate", processes.manage_argv("migrate", "--noinput"), env, migrate_log
    )
    # seed_demo prints the demo credentials: its output goes to the terminal.
    _run_to_end("manage.py seed_demo", processes.manage_argv("seed_demo"), env, None)


def _run_to_end(what: str, argv: list[str], env: dict[str, str], log_path: Path | None) -> None:
    """Run a one-off command to its end; Ctrl-C meanwhile stops it and the launch."""
    proc = processes.spawn(argv, env=env, log_path=log_path)
    try:
        while proc.poll() is None:
            _StopSignal.check()
            time.sleep(POLL_S)
    finally:
        processes.stop_all([proc])
    if proc.returncode != 0:
        where = f"; see {log_path}:\n{_tail(log_path)}" if log_path else ""
        raise LaunchError(f"{what} failed with exit code {proc.returncode}{where}")


def _start_children(launch: _Launch, env: dict[str, str], port: int, log_dir: Path) -> None:
    commands = {
        # Several web processes on one port (uvicorn's supervisor restarts one that dies);
        # any of them serves any follower, so none needs to be sticky.
        "web": processes.asgi_argv(
            port, workers=env_int("SLUICE_WEB_PROCESSES", os.cpu_count() or 1, minimum=1)
        ),
        # CPU-bound operators: processes, one per core we give them.
        "worker-cpu": processes.worker_argv(
            CPU_WORKER_QUEUES,
            "cpu",
            pool="prefork",
            concurrency=env_int("SLUICE_CPU_CONCURRENCY", 2, minimum=1),
        ),
        # Inference steps mostly wait on the engine: threads, many of them, all sharing one
        # engine per model so its batch stays full. Consumes every gpu.<model> queue.
        "worker-gpu": processes.worker_argv(
            ["gpu"], "gpu", pool="threads", concurrency=env_int("SLUICE_GPU_CONCURRENCY", 32)
        ),
        "beat": processes.beat_argv(launch.var_dir / "celerybeat-schedule"),
    }
    if launch.kafka_on:
        commands["kafka-worker"] = processes.kafka_worker_argv(f"kafka@{socket.gethostname()}")
    for name, argv in commands.items():
        log_path = log_dir / f"{name}.log"
        proc = processes.spawn(argv, env=env, log_path=log_path)
        launch.children.append(_Child(name, proc, log_path))


def _wait_until_serving(launch: _Launch, url: str) -> None:
    deadline = time.monotonic() + HTTP_WAIT_S
    while time.monotonic() < deadline:
        _StopSignal.check()
        _raise_if_any_exited(launch)
        status = processes.http_status(url)
        if status is not None:
            if status >= 500:
                _say(f"Warning: {url} answers {status}; see {launch.var_dir / 'log' / 'web.log'}")
            return
        time.sleep(POLL_S)
    raise LaunchError(f"{url} did not answer within {HTTP_WAIT_S:.0f} s; see the logs above")


def _supervise(launch: _Launch) -> None:
    """Return when a child exits on its own; Ctrl-C/SIGTERM raises _Stopped."""
    known = {child.proc.pid for child in launch.children}
    known.update(p.pid for p in (launch.redis, launch.kafka) if p is not None)
    while True:
        _StopSignal.check()
        try:
            _raise_if_any_exited(launch)
        except LaunchError as exc:
            _say(f"Sluice is stopping: {exc}")
            return
        # Orphans (a celery pool process whose parent died) are ours to reap as subreaper.
        processes.reap_orphans(keep=known)
        time.sleep(POLL_S)


def _raise_if_any_exited(launch: _Launch) -> None:
    for child in launch.children:
        if child.proc.poll() is not None:
            raise LaunchError(
                f"{child.name} exited with code {child.proc.returncode}; see {child.log_path}"
            )
    if launch.redis is not None and launch.redis.poll() is not None:
        log = launch.var_dir / "redis" / "redis.log"
        raise LaunchError(f"Redis exited with code {launch.redis.returncode}; see {log}")
    if launch.kafka is not None and launch.kafka.poll() is not None:
        log = launch.var_dir / "kafka" / "broker" / "kafka.log"
        raise LaunchError(f"Kafka exited with code {launch.kafka.returncode}; see {log}")
    if launch.postgres_dir is not None and not embedded.postgres_running(launch.postgres_dir):
        raise LaunchError(f"PostgreSQL stopped; see {launch.postgres_dir / 'log'}")


def _shutdown(launch: _Launch) -> None:
    """Children first (they hold connections), then Kafka, Redis, PostgreSQL."""
    # A second Ctrl-C must not cut the shutdown short: it is bounded by timeouts anyway.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    processes.stop_all([child.proc for child in launch.children])
    if launch.kafka is not None:
        kafka_broker.stop_broker(launch.kafka)
    if launch.redis is not None:
        embedded.stop_redis(launch.redis)
    if launch.postgres_dir is not None:
        embedded.stop_postgres(launch.postgres_dir)
    processes.reap_orphans()
    _say("Sluice stopped.")


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name) or str(default)
    try:
        return int(raw)
    except ValueError:
        raise LaunchError(f"{name} must be an integer, got {raw!r}") from None


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


if __name__ == "__main__":
    sys.exit(main())
