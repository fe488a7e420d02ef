"""The stream benchmark's processes: the web processes (uvicorn), the floor server and the
client processes (started, driven, stopped), and the CPU and memory each has used, read
from /proc.

Every process here inherits this one's open-file limit, which raise_nofile lifts to the
hard limit first (idle connections by the thousand: a socket each in the clients and the
web process, beside its Redis connections)."""

import contextlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

from sluice import embedded, processes
from sluice.embedded_paths import BASE_DIR

START_TIMEOUT_S = 60.0


def raise_nofile() -> int:
    """Lifts this process's soft limit on open files to its hard limit (children inherit
    it); returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        wanted = 1 << 20 if hard == resource.RLIM_INFINITY else hard
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def start_asgi(root: Path, name: str = "asgi") -> tuple[subprocess.Popen[bytes], int]:
    """One uvicorn process serving Sluice (`sluice.processes.asgi_argv`), its output in
    `<name>.log`, returned once it answers."""
    return start_web(root, 1, name)[0]


def start_web(
    root: Path, count: int, name: str = "asgi"
) -> list[tuple[subprocess.Popen[bytes], int]]:
    """`count` separate uvicorn processes on ports of their own, as web replicas behind a
    load balancer would be (not one supervisor's workers sharing a socket: a client picks
    its process, and one can be killed on its own). Logs: `<name>.log`, or `<name>-<n>.log`
    for several. Started together, returned once each answers."""
    started: list[tuple[subprocess.Popen[bytes], int, Path]] = []
    try:
        for n in range(count):
            port = embedded.free_port()
            log = root / (f"{name}.log" if count == 1 else f"{name}-{n}.log")
            argv = processes.asgi_argv(port)
            started.append((processes.spawn(argv, env=dict(os.environ), log_path=log), port, log))
        for proc, port, log in started:
            processes.wait_until_serving(f"http://127.0.0.1:{port}/accounts/login/", proc, log)
    except RuntimeError:
        processes.stop_all([proc for proc, _, _ in started])
        raise
    return [(proc, port) for proc, port, _ in started]


def start_floor(root: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = embedded.free_port()
    log = root / "floor.log"
    argv = [sys.executable, "-m", "bench.stream_floor", "--port", str(port)]
    proc = processes.spawn(
        [*argv, "--redis", os.environ["REDIS_URL"]], env=dict(os.environ), log_path=log
    )
    deadline = time.monotonic() + START_TIMEOUT_S
    while "ready" not in (log.read_text() if log.exists() else ""):
        if time.monotonic() > deadline or proc.poll() is not None:
            processes.stop_all([proc])
            raise RuntimeError(f"the floor server did not start; see {log}")
        time.sleep(0.1)
    return proc, port


def start_clients(root: Path, count: int) -> list[subprocess.Popen[bytes]]:
    """Client processes, driven through their stdin and stdout (bench/stream_clients.py)."""
    procs = []
    for n in range(count):
        with (root / f"clients-{n}.log").open("ab") as log:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "bench.stream_clients"],
                    env=dict(os.environ),
                    cwd=BASE_DIR,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=log,
                    start_new_session=True,
                    preexec_fn=processes.die_with_parent(),
                )
            )
    return procs


def tell(proc: subprocess.Popen[bytes], command: dict[str, Any]) -> None:
    stdin: IO[bytes] | None = proc.stdin
    assert stdin is not None
    stdin.write((json.dumps(command) + "\n").encode())
    stdin.flush()


def hear(proc: subprocess.Popen[bytes]) -> dict[str, Any]:
    stdout: IO[bytes] | None = proc.stdout
    assert stdout is not None
    line = stdout.readline()
    if not line:
        raise RuntimeError(f"client process {proc.pid} ended; see its clients-*.log")
    body: dict[str, Any] = json.loads(line)
    return body


def stop_processes(stack_procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in stack_procs:
        if proc.stdin is not None and proc.poll() is None:
            with contextlib.suppress(OSError):
                tell(proc, {"cmd": "exit"})
    processes.stop_all(stack_procs)


TICK_S = 1 / os.sysconf("SC_CLK_TCK")


def _stats() -> dict[int, tuple[int, float, float]]:
    """pid -> (ppid, its own CPU seconds, those of the children it has reaped)."""
    out: dict[int, tuple[int, float, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = raw[raw.rindex(")") + 2 :].split()
        own = (int(fields[11]) + int(fields[12])) * TICK_S
        out[int(entry)] = (int(fields[1]), own, (int(fields[13]) + int(fields[14])) * TICK_S)
    return out


def cpu_seconds(groups: dict[str, list[int]]) -> dict[str, float]:
    """CPU seconds so far of each group's processes and their descendants (the producer,
    this process, counts itself only: its threads, not its children)."""
    stats = _stats()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    out: dict[str, float] = {}
    for name, roots in groups.items():
        total = 0.0
        for root in roots:
            if name == "producer":
                total += stats[root][1] if root in stats else 0.0
                continue
            todo = [root]
            while todo:
                pid = todo.pop()
                if pid in stats:
                    total += stats[pid][1] + stats[pid][2]
                    todo.extend(children.get(pid, []))
        out[name] = total
    return out


def rss_mb(roots: list[int]) -> float:
    """Resident memory (VmRSS) of these processes and their descendants, in MiB."""
    stats = _stats()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total_kb = 0
    todo = list(roots)
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kb += int(line.split()[1])
    return total_kb / 1024
