"""A real single-node Kafka broker (KRaft: broker and controller in one JVM) from Apache's
jars, for `make run` and the tests, like the embedded PostgreSQL and Redis.

The jars come from Maven Central through Maven, once per libs folder; the broker runs
`java ... kafka.Kafka` with its data and log in a work folder and gets SIGTERM when its
parent dies. After a launcher killed with SIGKILL, the next start replaces a broker left
running. No Django imports: this runs before settings load.
"""

import base64
import contextlib
import fcntl
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from sluice.embedded_paths import var_dir
from sluice.processes import die_with_parent, process_alive, terminate_pid

KAFKA_VERSION = "4.4.0"
# The broker (Scala 2.13 build), the storage tool, and the SLF4J 1.7 binding to Log4j 2,
# which Kafka 4 itself logs with (its log4j-core comes with kafka_2.13, same version).
# slf4j-reload4j 2.x does not bind to the SLF4J 1.7 API Kafka brings: SLF4J then drops
# every line, the "started" line and the errors included, and Log4j 2 complains it has
# no configuration.
MAVEN_ARTIFACTS = (
    f"org.apache.kafka:kafka_2.13:{KAFKA_VERSION}",
    f"org.apache.kafka:kafka-tools:{KAFKA_VERSION}",
    "org.apache.logging.log4j:log4j-slf4j-impl:2.25.5",
)
DEPENDENCY_PLUGIN = "org.apache.maven.plugins:maven-dependency-plugin:3.8.1"
STAMP_NAME = ".sluice-jars"
FETCH_TIMEOUT_S = 900.0
FORMAT_TIMEOUT_S = 120.0
START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 20.0
JVM_OPTIONS = ("-Xmx512m", "-Xms256m", "-XX:+UseSerialGC")
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
STACK_FRAME = re.compile(r"\s+(at |\.\.\. \d+ more)")

# The pidfile of each broker this process started, removed by stop_broker.
_pid_files: dict[int, Path] = {}


def java_available() -> bool:
    """Whether this machine can fetch the jars (mvn) and run the broker (java)."""
    return shutil.which("java") is not None and shutil.which("mvn") is not None


def bootstrap_for(port: int) -> str:
    return f"127.0.0.1:{port}"


def default_libs_dir() -> Path:
    """Shared by every work folder: the jars do not change with the data."""
    override = os.environ.get("SLUICE_KAFKA_LIBS")
    return Path(override) if override else var_dir() / "kafka" / "libs"


# --- The jars ---------------------------------------------------------------------------


def jars_ready(libs_dir: Path) -> bool:
    """Whether libs_dir holds a complete fetch of this version's jars."""
    try:
        return (libs_dir / STAMP_NAME).read_text() == _stamp_text()
    except OSError:
        return False


def ensure_jars(libs_dir: Path) -> Path:
    """Fetch the broker's jars into libs_dir unless they are there; return libs_dir.

    Maven copies them into a temporary folder beside libs_dir, renamed into place when
    complete, so an interrupted fetch never leaves a half-filled libs_dir. A file lock
    keeps two processes (two test sessions, `make run`) from fetching at once; the second
    waits and then finds the jars. Raises RuntimeError with Maven's output on failure.
    """
    libs_dir = libs_dir.resolve()
    if jars_ready(libs_dir):
        return libs_dir
    libs_dir.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(libs_dir.parent / f".{libs_dir.name}.lock"):
        if jars_ready(libs_dir):  # fetched by whoever held the lock before us
            return libs_dir
        _discard_unfinished_fetches(libs_dir)
        fetch_dir = Path(tempfile.mkdtemp(prefix=_fetch_prefix(libs_dir), dir=libs_dir.parent))
        try:
            fetched = _maven_copy_jars(fetch_dir)
            (fetched / STAMP_NAME).write_text(_stamp_text())
            if libs_dir.exists():  # jars of another version: replaced, not mixed
                shutil.rmtree(libs_dir)
            fetched.rename(libs_dir)
        finally:
            shutil.rmtree(fetch_dir, ignore_errors=True)
    return libs_dir


def _stamp_text() -> str:
    return "\n".join(MAVEN_ARTIFACTS) + "\n"


def _fetch_prefix(libs_dir: Path) -> str:
    return f".{libs_dir.name}.fetch-"


def _discard_unfinished_fetches(libs_dir: Path) -> None:
    """Temporary folders of a fetch whose process died; only a lock holder makes them."""
    for leftover in libs_dir.parent.glob(f"{_fetch_prefix(libs_dir)}*"):
        shutil.rmtree(leftover, ignore_errors=True)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with path.open("a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)  # released when the file closes or we die
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _maven_copy_jars(fetch_dir: Path) -> Path:
    """Resolve MAVEN_ARTIFACTS and their dependencies into fetch_dir/libs (Maven's own
    cache, ~/.m2, makes a second fetch quick)."""
    (fetch_dir / "pom.xml").write_text(_pom_xml())
    out_dir = fetch_dir / "libs"
    argv = [
        "mvn", "-q", "-B", "-f", str(fetch_dir / "pom.xml"),
        f"{DEPENDENCY_PLUGIN}:copy-dependencies", f"-DoutputDirectory={out_dir}",
    ]  # fmt: skip
    try:
        result = subprocess.run(
            argv,
            cwd=fetch_dir,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=FETCH_TIMEOUT_S,
            # Killed with its parent: a test session that ends mid-fetch leaves no Maven.
            preexec_fn=die_with_parent(),
        )
    except subprocess.TimeoutExpired:
        raise RuntimeError(
            f"mvn did not fetch the Kafka jars within {FETCH_TIMEOUT_S:.0f} s"
        ) from None
    # Maven 3.8 writes colour resets even in batch mode.
    output = ANSI_ESCAPE.sub("", (result.stdout + result.stderr).decode(errors="replace"))
    if result.returncode != 0 or not any(out_dir.glob("kafka_2.13-*.jar")):
        tail = "\n".join(output.splitlines()[-30:])
        raise RuntimeError(
            f"mvn could not fetch the Kafka jars (exit {result.returncode}):\n{tail}"
        )
    return out_dir


def _pom_xml() -> str:
    dependencies = "".join(
        "<dependency><groupId>{}</groupId><artifactId>{}</artifactId>"
        "<version>{}</version></dependency>\n".format(*coordinates.split(":"))
        for coordinates in MAVEN_ARTIFACTS
    )
    return (
        '<project xmlns="http://maven.apache.org/POM/4.0.0">\n'
        "<modelVersion>4.0.0</modelVersion>\n"
        "<groupId>local.sluice</groupId><artifactId>kafka-jars</artifactId>"
        "<version>0</version><packaging>pom</packaging>\n"
        f"<dependencies>\n{dependencies}</dependencies>\n"
        "</project>\n"
    )


# --- The broker -------------------------------------------------------------------------


def start_broker(
    work_dir: Path,
    port: int,
    controller_port: int,
    libs_dir: Path,
    *,
    check: Callable[[], None] | None = None,
) -> subprocess.Popen[bytes]:
    """Run a broker on 127.0.0.1:port (its controller on controller_port) with its data
    in work_dir/data and its log in work_dir/kafka.log; formats the storage when new.

    Returns once the broker answers a metadata request with its own cluster id; raises
    RuntimeError naming the port and showing the log if it exits or stays silent.
    `check` is called while waiting and may raise to give up (the broker is stopped).
    """
    work_dir = work_dir.resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    pid_file = work_dir / "kafka.pid"
    _stop_leftover_broker(pid_file)
    config = _write_config(work_dir, port, controller_port)
    cluster_id = _format_storage_once(work_dir, config, libs_dir)
    log_path = work_dir / "kafka.log"
    argv = [
        "java", *JVM_OPTIONS,
        f"-Dlog4j2.configurationFile={_write_log_config(work_dir)}",
        "-cp", _classpath(libs_dir), "kafka.Kafka", str(config),
    ]  # fmt: skip
    with log_path.open("ab") as log_file:
        proc = subprocess.Popen(
            argv,
            cwd=work_dir,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent(),
        )
    pid_file.write_text(f"{proc.pid}\n")
    _pid_files[proc.pid] = pid_file
    try:
        _wait_for_broker(proc, port, cluster_id, log_path, check)
    except BaseException:
        stop_broker(proc)
        raise
    return proc


def stop_broker(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM (a controlled shutdown: the logs are flushed and closed cleanly), SIGKILL
    if it takes too long."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    pid_file = _pid_files.pop(proc.pid, None)
    if pid_file is not None:
        pid_file.unlink(missing_ok=True)


def _write_config(work_dir: Path, port: int, controller_port: int) -> Path:
    """server.properties, rewritten at each start: the ports may differ from the last one
    (the cluster id lives in data/meta.properties, and a static voter list is not kept in
    the metadata log, so the same storage serves on new ports)."""
    settings = {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.voters": f"1@127.0.0.1:{controller_port}",
        "listeners": f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}",
        "advertised.listeners": f"PLAINTEXT://127.0.0.1:{port}",
        "controller.listener.names": "CONTROLLER",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "log.dirs": str(work_dir / "data"),
        "num.partitions": "4",
        "auto.create.topics.enable": "true",
        # One node: internal topics with one replica, or they are never created.
        "offsets.topic.replication.factor": "1",
        "offsets.topic.min.isr": "1",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        # The default 50 partitions of each make a first consumer group or transaction
        # wait seconds on one small machine, for no gain with one broker.
        "offsets.topic.num.partitions": "4",
        "transaction.state.log.num.partitions": "4",
        # No other member will join: do not hold a new group's first rebalance for 3 s.
        "group.initial.rebalance.delay.ms": "0",
    }
    path = work_dir / "server.properties"
    path.write_text("".join(f"{key}={value}\n" for key, value in settings.items()))
    return path


def _write_log_config(work_dir: Path) -> Path:
    """Log4j 2 (Kafka 4's logging): warnings and errors, and the line that says the broker
    started; Kafka's INFO output is thousands of lines per start."""
    path = work_dir / "log4j2.properties"
    path.write_text(
        "status = warn\n"
        "appender.out.type = Console\n"
        "appender.out.name = out\n"
        "appender.out.layout.type = PatternLayout\n"
        "appender.out.layout.pattern = [%d] %p %m (%c)%n\n"
        "rootLogger.level = WARN\n"
        "rootLogger.appenderRef.out.ref = out\n"
        "logger.started.name = kafka.server.KafkaRaftServer\n"
        "logger.started.level = INFO\n"
    )
    return path


def _classpath(libs_dir: Path) -> str:
    return str(libs_dir.resolve() / "*")  # java expands the wildcard itself


def _format_storage_once(work_dir: Path, config: Path, libs_dir: Path) -> str:
    """Format data/ for a new cluster unless it was formatted before; return the cluster id."""
    meta = work_dir / "data" / "meta.properties"
    if not meta.exists():
        argv = [
            "java", *JVM_OPTIONS, "-cp", _classpath(libs_dir), "kafka.tools.StorageTool",
            "format", "-t", _new_cluster_id(), "-c", str(config),
        ]  # fmt: skip
        try:
            # Its own session: a Ctrl-C in the terminal must not cut a format in half (it
            # takes a second; the launcher stops right after it).
            result = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=FORMAT_TIMEOUT_S,
                start_new_session=True,
            )
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"formatting Kafka's storage in {work_dir} timed out") from None
        if result.returncode != 0 or not meta.exists():
            output = (result.stdout + result.stderr).decode(errors="replace")
            raise RuntimeError(f"formatting Kafka's storage in {work_dir} failed:\n{output}")
    return _cluster_id(meta)


def _new_cluster_id() -> str:
    """What `StorageTool random-uuid` prints (a random UUID, URL-safe base64, no padding),
    without starting a JVM for it. Kafka refuses ids that start with a dash."""
    while True:
        cluster_id = base64.urlsafe_b64encode(os.urandom(16)).rstrip(b"=").decode()
        if not cluster_id.startswith("-"):
            return cluster_id


def _cluster_id(meta: Path) -> str:
    for line in meta.read_text().splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "cluster.id":
            return value.strip()
    raise RuntimeError(f"{meta} names no cluster.id")


def _wait_for_broker(
    proc: subprocess.Popen[bytes],
    port: int,
    cluster_id: str,
    log_path: Path,
    check: Callable[[], None] | None,
) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if check is not None:
            check()
        if proc.poll() is not None:
            raise RuntimeError(
                f"Kafka exited with code {proc.returncode} while starting on "
                f"127.0.0.1:{port} (is the port in use?); see {log_path}:\n{_tail(log_path)}"
            )
        # Only once the port accepts: before that librdkafka would log every refusal.
        if _accepts(port) and _answering_cluster(port) == cluster_id:
            return
        time.sleep(0.2)
    raise RuntimeError(
        f"Kafka did not answer on 127.0.0.1:{port} within {START_TIMEOUT_S:.0f} s; "
        f"see {log_path}:\n{_tail(log_path)}"
    )


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _answering_cluster(port: int) -> str | None:
    """The cluster id of the broker answering a metadata request on port, or None. Another
    broker on the port would answer too: the id tells ours."""
    admin = AdminClient({"bootstrap.servers": bootstrap_for(port)})
    try:
        cluster_id: str | None = admin.list_topics(timeout=2).cluster_id
        return cluster_id
    except KafkaException:
        return None


def _stop_leftover_broker(pid_file: Path) -> None:
    """Stop a broker that an earlier launcher, killed with SIGKILL, left running on this
    work dir: it holds the data dir's lock and the ports."""
    try:
        pid = int(pid_file.read_text().strip())
    except (FileNotFoundError, ValueError):
        return
    if _is_broker(pid, pid_file.parent):
        terminate_pid(pid, STOP_TIMEOUT_S)
    pid_file.unlink(missing_ok=True)


def _is_broker(pid: int, work_dir: Path) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    ours = str(work_dir / "server.properties").encode()
    return b"kafka.Kafka" in cmdline and ours in cmdline and process_alive(pid)


def _tail(path: Path, lines: int = 20) -> str:
    """The log's last lines without Java's stack frames, which would crowd out the
    messages that say what went wrong ("Address already in use")."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    messages = [line for line in text.splitlines() if not STACK_FRAME.match(line)]
    return "\n".join(messages[-lines:])
