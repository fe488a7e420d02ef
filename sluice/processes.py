"""The command lines of Sluice's processes and how to start and stop them.

One place for both the launcher (`make run`) and the test harness, so the processes the
tests run are the processes users run. No Django imports: this runs before settings load.
"""

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import IO

from sluice.embedded_paths import BASE_DIR

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36

# Loaded once here: dlopen between fork and exec (in a preexec function) is not safe.
_libc = ctypes.CDLL(None, use_errno=True)


def asgi_argv(port: int, *, workers: int = 1) -> list[str]:
    """uvicorn serving Sluice on `port`. With `workers` above 1 its supervisor forks that
    many processes sharing the listening socket and starts a new one when one dies.
    No permessage-deflate: the feed's frames are small and already batched; compressing
    them cost the web process more CPU than any other single part of the feed path."""
    argv = [
        sys.executable, "-m", "uvicorn", "sluice.asgi:application",
        "--host", "127.0.0.1", "--port", str(port), "--no-access-log",
        "--ws-per-message-deflate", "false",
    ]  # fmt: skip
    return [*argv, "--workers", str(workers)] if workers > 1 else argv


def worker_argv(queues: list[str], name: str, *, pool: str, concurrency: int) -> list[str]:
    return [
        sys.executable, "-m", "celery", "-A", "sluice", "worker",
        "-Q", ",".join(queues), "-n", f"{name}@%h",
        "--pool", pool, "--concurrency", str(concurrency), "--loglevel", "INFO",
        # Gossip, mingle and heartbeat are cluster chatter Sluice does not use; without
        # them a worker starts faster and sends less to the broker.
        "--without-gossip", "--without-mingle", "--without-heartbeat",
    ]  # fmt: skip


def beat_argv(schedule_file: Path) -> list[str]:
    return [
        sys.executable, "-m", "celery", "-A", "sluice", "beat",
        "--schedule", str(schedule_file), "--loglevel", "INFO",
    ]  # fmt: skip


def kafka_worker_argv(name: str | None = None) -> list[str]:
    """Consumes the Kafka topics of stream deployments (apps/streams' kafka_worker command).
    A `name` of its own, kept across restarts, gets a restarted worker its partitions back at
    once."""
    argv = [sys.executable, str(BASE_DIR / "manage.py"), "kafka_worker"]
    return [*argv, "--name", name] if name else argv


def manage_argv(*args: str) -> list[str]:
    return [sys.executable, str(BASE_DIR / "manage.py"), *args]


def set_child_subreaper() -> None:
    """Adopt orphaned descendants (the postmaster that pg_ctl daemonizes) instead of init,
    so they stay visible as ours and we reap them."""
    if _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")


def die_with_parent() -> Callable[[], None]:
    """A preexec function: the child gets SIGTERM when the process that started it dies,
    so a launcher killed with SIGKILL does not leave workers behind.

    preexec functions are unsafe in a process with threads when they take locks or
    allocate; this one only makes system calls, and the launcher has one thread.
    """
    parent = os.getpid()

    def preexec() -> None:
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        # The parent may have died between fork and prctl; then no signal will come.
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def spawn(
    argv: Sequence[str], *, env: dict[str, str], log_path: Path | None
) -> subprocess.Popen[bytes]:
    """Start a child in its own session (a terminal's Ctrl-C reaches only the launcher,
    which then stops children in order), output appended to log_path or inherited."""
    if log_path is None:
        return _popen(argv, env, None)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        return _popen(argv, env, log)


def _popen(
    argv: Sequence[str], env: dict[str, str], log: IO[bytes] | None
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        list(argv),
        env=env,
        cwd=BASE_DIR,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT if log is not None else None,
        start_new_session=True,
        preexec_fn=die_with_parent(),
    )


def stop_all(procs: Sequence[subprocess.Popen[bytes]], timeout: float = 10) -> None:
    """SIGTERM each child's process group (celery's pool children and uvicorn's workers
    too), SIGKILL groups still alive after timeout, and reap everything."""
    groups = [proc.pid for proc in procs]  # each child leads its own session and group
    for pgid in groups:
        _signal_group(pgid, signal.SIGTERM)
    _wait_groups_gone(procs, groups, timeout)
    for pgid in groups:
        if _group_alive(pgid):
            _signal_group(pgid, signal.SIGKILL)
    _wait_groups_gone(procs, groups, 5)
    for proc in procs:
        proc.wait()
    reap_orphans()


def _wait_groups_gone(
    procs: Sequence[subprocess.Popen[bytes]], groups: list[int], timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while any(_group_alive(pgid) for pgid in groups) and time.monotonic() < deadline:
        for proc in procs:
            proc.poll()
        reap_orphans(keep={proc.pid for proc in procs})
        time.sleep(0.05)


def signal_pid(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def wait_gone(pid: int, timeout: float) -> bool:
    """Wait until pid has exited; reap it if it is our child (a subreaper adopts the
    postmaster). True if it is gone."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        if not process_alive(pid):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def terminate_pid(pid: int, timeout: float) -> None:
    """SIGTERM, and SIGKILL if it is still there after `timeout` (a leftover server)."""
    signal_pid(pid, signal.SIGTERM)
    if not wait_gone(pid, timeout):
        signal_pid(pid, signal.SIGKILL)
        wait_gone(pid, 5)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def _group_alive(pgid: int) -> bool:
    """Whether a live (not zombie) process is in the group; kill(-pgid, 0) would also
    count zombies that only wait to be reaped."""
    return any(stat[2] == pgid and stat[0] != "Z" for stat in _all_stats().values())


def process_alive(pid: int) -> bool:
    """Whether pid runs; a zombie (exited, not yet reaped) counts as gone."""
    stat = _read_stat(pid)
    return stat is not None and stat[0] not in {"Z", "X"}


def reap_orphans(keep: Iterable[int] = ()) -> None:
    """Reap exited children other than `keep` (whose Popen objects want their exit
    status). As a subreaper we inherit orphans, and their zombies are ours to collect."""
    me = os.getpid()
    kept = set(keep)
    for pid, (state, ppid, _pgrp) in _all_stats().items():
        if ppid == me and state == "Z" and pid not in kept:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)


def _all_stats() -> dict[int, tuple[str, int, int]]:
    stats: dict[int, tuple[str, int, int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _read_stat(int(entry))
            if stat is not None:
                stats[int(entry)] = stat
    return stats


def _read_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, pgrp) from /proc/<pid>/stat, or None if there is no such process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name in parentheses may itself contain spaces and parentheses.
    fields = raw[raw.rindex(")") + 2 :].split()
    return fields[0], int(fields[1]), int(fields[2])


def http_status(url: str) -> int | None:
    """The HTTP status url answers with, or None if nothing answers yet."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            status: int = response.status
            return status
    except urllib.error.HTTPError as exc:
        exc.close()
        return exc.code
    except (urllib.error.URLError, OSError):
        return None


def wait_until_serving(
    url: str, proc: subprocess.Popen[bytes], log_path: Path, timeout: float = 60.0
) -> None:
    """Returns once url answers 200; raises if the server exits or stays silent or broken.
    For the test harness and benchmarks (the launcher has its own loop, which also watches
    its other children and Ctrl-C)."""
    deadline = time.monotonic() + timeout
    status = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"web server exited with {proc.returncode}; see {log_path}")
        status = http_status(url)
        if status == 200:
            return
        time.sleep(0.1)
    raise RuntimeError(f"{url} answered {status} after {timeout}s, not 200; see {log_path}")
