"""`make run` end to end: the launcher starts the embedded services (Kafka too, where Java
and Maven are present) and every process, serves the login page, and on Ctrl-C stops all
of it and leaves nothing running."""

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psycopg
import pytest

from sluice import embedded, embedded_paths, kafka_broker

START_TIMEOUT_S = 180
STOP_TIMEOUT_S = 60


def _launcher_env(var_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    # The test plugin points these at the test's own services; the launcher must start
    # its embedded ones.
    env.pop("DATABASE_URL", None)
    env.pop("REDIS_URL", None)
    env.pop("KAFKA_BOOTSTRAP_SERVERS", None)
    # The jars every session shares, not a fetch into this test's fresh var dir.
    env["SLUICE_KAFKA_LIBS"] = str(kafka_broker.default_libs_dir().resolve())
    env["SLUICE_VAR_DIR"] = str(var_dir)
    env["PORT"] = str(embedded.free_port())
    env["SLUICE_REDIS_PORT"] = str(embedded.free_port())
    env["SLUICE_KAFKA_PORT"] = str(embedded.free_port())
    env["SLUICE_KAFKA_CONTROLLER_PORT"] = str(embedded.free_port())
    return env


def _proc_table() -> dict[int, tuple[int, str, str]]:
    """pid -> (ppid, start time, state) for every process, from /proc/<pid>/stat."""
    table: dict[int, tuple[int, str, str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text()
        except OSError:
            continue
        fields = raw[raw.rindex(")") + 2 :].split()
        # fields[0] is stat field 3 (state); start time is field 22.
        table[int(entry.name)] = (int(fields[1]), fields[19], fields[0])
    return table


def _descendants(root: int) -> dict[int, str]:
    """pid -> start time of root's live descendants (the start time tells a pid reused
    later from the process we saw)."""
    table = _proc_table()
    found: dict[int, str] = {}
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, started, state) in table.items():
            if ppid == parent and pid not in found and state != "Z":
                found[pid] = started
                frontier.append(pid)
    return found


def _still_running(processes: dict[int, str]) -> list[int]:
    table = _proc_table()
    return [
        pid
        for pid, started in processes.items()
        if pid in table and table[pid][1] == started and table[pid][2] != "Z"
    ]


def _login_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            status: int = response.status
            return status
    except urllib.error.HTTPError as exc:
        exc.close()
        return exc.code
    except (urllib.error.URLError, OSError):
        return None


def _wait_for_login_page(launcher: subprocess.Popen[bytes], url: str, var_dir: Path) -> None:
    output = var_dir / "launcher-output.txt"
    deadline = time.monotonic() + START_TIMEOUT_S
    status = None
    while time.monotonic() < deadline:
        assert launcher.poll() is None, f"launcher exited early:\n{output.read_text()}"
        status = _login_status(url)
        if status == 200:
            return
        # The launcher says "running" once the page answers at all: another answer than
        # 200 after that will not change by waiting.
        if status is not None and "Sluice is running at" in output.read_text():
            break
        time.sleep(0.5)
    web_log = _tail(var_dir / "log" / "web.log")
    pytest.fail(f"{url} answered {status}:\n{output.read_text()}\nweb.log:\n{web_log}")


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(none)"


def _force_cleanup(launcher: subprocess.Popen[bytes], var_dir: Path) -> None:
    """After a failed test: stop what the launcher left, so one failure does not leave
    servers running."""
    if launcher.poll() is None:
        leftovers = _descendants(launcher.pid)
        launcher.send_signal(signal.SIGINT)
        try:
            launcher.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            launcher.kill()
            launcher.wait()
            for pid in _still_running(leftovers):
                os.kill(pid, signal.SIGKILL)
    embedded.stop_postgres(embedded_paths.postgres_data_dir(var_dir))


@pytest.mark.timeout(2 * (START_TIMEOUT_S + STOP_TIMEOUT_S) + 60)
def test_launcher_serves_ctrl_c_leaves_nothing_running_and_a_restart_keeps_the_data() -> None:
    var_dir = embedded_paths.BASE_DIR / "var" / f"test-launcher-{secrets.token_hex(4)}"
    var_dir.mkdir(parents=True)
    try:
        first = _launch_check_and_stop(var_dir)
        second = _launch_check_and_stop(var_dir)
        assert second == first  # same demo user row, same graphs: the data survived
    finally:
        shutil.rmtree(var_dir, ignore_errors=True)


def _launch_check_and_stop(var_dir: Path) -> list[tuple[object, ...]]:
    output = var_dir / "launcher-output.txt"
    env = _launcher_env(var_dir)
    with output.open("wb") as out:
        launcher = subprocess.Popen(
            [sys.executable, "-m", "sluice.launcher"],
            cwd=embedded_paths.BASE_DIR,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        return _check_start_and_stop(launcher, var_dir, int(env["PORT"]), output)
    finally:
        _force_cleanup(launcher, var_dir)


def _expects_kafka() -> bool:
    """The launcher starts a broker unless told not to or without Java and Maven."""
    return os.environ.get("SLUICE_KAFKA", "").lower() != "off" and kafka_broker.java_available()


def _kafka_dir(var_dir: Path) -> Path:
    return var_dir / "kafka" / "broker"


def _broker_pid(var_dir: Path) -> int | None:
    try:
        return int((_kafka_dir(var_dir) / "kafka.pid").read_text())
    except (FileNotFoundError, ValueError):
        return None


def _cluster_id(var_dir: Path) -> str:
    """Kafka's storage outlives a restart: the second launch serves the same cluster."""
    meta = _kafka_dir(var_dir) / "data" / "meta.properties"
    return next(line for line in meta.read_text().splitlines() if line.startswith("cluster.id="))


def _demo_data(pg_dir: Path) -> list[tuple[object, ...]]:
    with psycopg.connect(embedded_paths.embedded_database_url(pg_dir)) as conn:
        return conn.execute(
            "SELECT u.id, u.date_joined, g.slug FROM auth_user u"
            " JOIN tenants_membership m ON m.user_id = u.id"
            " JOIN graphs_streamgraph g ON g.tenant_id = m.tenant_id"
            " WHERE u.username = 'demo' ORDER BY g.slug"
        ).fetchall()


def _check_start_and_stop(
    launcher: subprocess.Popen[bytes], var_dir: Path, port: int, output: Path
) -> list[tuple[object, ...]]:
    _wait_for_login_page(launcher, f"http://127.0.0.1:{port}/accounts/login/", var_dir)
    pg_dir = embedded_paths.postgres_data_dir(var_dir)
    postmaster = embedded.postmaster_pid(pg_dir)
    assert postmaster is not None, "the embedded PostgreSQL is not running"
    demo = _demo_data(pg_dir)
    assert [row[2] for row in demo] == ["fanout-summaries", "ticket-triage"]
    started = _descendants(launcher.pid)
    # The launcher is a subreaper, so the postmaster that pg_ctl daemonized is its child.
    assert postmaster in started, "the postmaster was not adopted by the launcher"
    assert len(started) >= 6  # postgres, redis, uvicorn, two workers, beat
    kafka_on = _expects_kafka()
    if kafka_on:
        assert _broker_pid(var_dir) in started, "no Kafka broker under the launcher"
        assert "kafka-worker" in output.read_text()  # in the list of logs

    launcher.send_signal(signal.SIGINT)
    assert launcher.wait(STOP_TIMEOUT_S) == 0, output.read_text()

    assert _still_running(started) == [], output.read_text()
    assert not (pg_dir / "postmaster.pid").exists()
    assert not (var_dir / "redis" / "redis.pid").exists()
    assert _broker_pid(var_dir) is None
    assert "Sluice is running at" in output.read_text()
    return [*demo, (_cluster_id(var_dir),)] if kafka_on else demo
