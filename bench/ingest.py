"""Stream ingestion: events/s accepted durably by `POST /api/graphs/<slug>/events/bulk/`
on the real ASGI server, against the floor: the same rows written by psycopg COPY into the
same PostgreSQL, interleaved in the same invocation.

    python -m bench ingest [--quick]

Ours: the web server as `make run` starts it (`sluice.processes.asgi_argv`: one uvicorn
process), CLIENTS client threads in this process, each with one keep-alive http.client
connection, posting pre-serialised bodies of BATCH events (a small JSON object the
source's input schema accepts, and a partition key) with a bearer API key (`events:write`)
until EVENTS events have been sent. Only 202 answers count; any other answer is reported
and fails the run. One Celery worker consumes the control queue only: a bulk request hands
its step messages to it (one message per request), and it publishes them, so the step
messages pile up in Redis (no worker runs the steps). After each round the stream run's
`runs_event` rows must have grown by exactly the events accepted, and, once the hand-off
worker is done, Redis's queues by as many messages. `events_per_s` counts to the last
202 (accepted durably: committed); `dispatched_events_per_s` to the last step message in
Redis, and the worker's CPU is in the table.

Floor: the same rows (one `runs_event` row, node "input", and one queued source `runs_step`
row per event, every column our path writes, the same payloads and keys, the same tenant)
for a run of their own, written by CLIENTS psycopg connections, each COPYing BATCH events
and their steps per transaction, the COPY text prepared before the clock starts. No
admission, no open-step count, no broker message: the least the database must do. Its rows
are deleted (and the tables vacuumed) after each round, so our admission count of waiting
steps sees our own backlog only.

Rounds: one unmeasured warm-up of each, then ours, floor, ours, floor, ...; rates are the
median over rounds of events / wall time (first request sent to last answer read).
"""

import http.client
import json
import os
import queue
import statistics
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from bench.inference_kit import keep_logs, pct, rounded
from bench.stack import services, start_worker
from bench.stream_procs import cpu_seconds, start_asgi
from sluice import embedded, processes
from workers.queues import CONTROL_QUEUE

BATCH = 500
CLIENTS = 4
SIZES = {"quick": (20_000, 2), "full": (200_000, 3)}  # events per round, rounds per side
WARM_UP_EVENTS = CLIENTS * BATCH * 2
HTTP_TIMEOUT_S = 120.0
SLUG = "clicks"
PATH = f"/api/graphs/{SLUG}/events/bulk/"
# Far above what the bench sends: admission must never refuse (it still runs its checks).
LIMITS = {
    "max_events_per_s": 1_000_000_000,
    "max_queued_steps": 1_000_000_000,
    "api_requests_per_min": 1_000_000_000,
}
ACTIONS = ("view", "click", "add_to_cart", "purchase")
SPEC: dict[str, Any] = {
    "nodes": [
        {
            "id": "in",
            "type": "source.manual",
            "config": {
                "example": {"user": "u-1", "action": "view", "sku": "SKU-1", "qty": 1},
                "input_schema": {
                    "type": "object",
                    "required": ["user", "action", "sku", "qty"],
                    "properties": {
                        "user": {"type": "string"},
                        "action": {"type": "string", "enum": list(ACTIONS)},
                        "sku": {"type": "string"},
                        "qty": {"type": "integer", "minimum": 1},
                        "price": {"type": "number"},
                        "session": {"type": "string"},
                    },
                },
            },
        },
        {"id": "t", "type": "transform.template", "config": {"template": "{{ action }}"}},
        {"id": "s", "type": "sink.table", "config": {"table": "actions"}},
    ],
    "edges": [["in", "t"], ["t", "s"]],
}


def event(n: int) -> tuple[dict[str, Any], str]:
    """The n-th event's payload (about 120 bytes of JSON) and partition key."""
    user = f"u-{n % 9973:05d}"
    payload = {
        "user": user,
        "action": ACTIONS[n % len(ACTIONS)],
        "sku": f"SKU-{n % 5003:05d}",
        "qty": 1 + n % 3,
        "price": round(1.99 + n % 200 * 0.5, 2),
        "session": f"s-{n // 40:08x}",
    }
    return payload, user


@dataclass
class Round:
    side: str
    measured: bool
    events: int  # accepted (ours: 202 answers' counts; floor: rows committed)
    wall_s: float
    # Ours: from the first request to the last step message in Redis.
    dispatched_s: float | None = None
    latencies_ms: list[float] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # non-202 answers and errors
    cpu_s: dict[str, float] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.events / self.wall_s


@dataclass
class Stack:
    port: int
    secret: str
    tenant: Any
    version: Any
    floor_run: Any
    cpu_groups: dict[str, list[int]]
    stream_run: str | None = None


# --- ours: HTTP clients ---------------------------------------------------------------------


def bodies(events: int) -> list[bytes]:
    out = []
    for start in range(0, events, BATCH):
        items = [event(n) for n in range(start, min(events, start + BATCH))]
        out.append(json.dumps({"events": [{"payload": p, "key": k} for p, k in items]}).encode())
    return out


@dataclass
class ClientTally:
    accepted: int = 0
    runs: set[str] = field(default_factory=set)
    # Ours: from the first request to the last step message in Redis.
    dispatched_s: float | None = None
    latencies_ms: list[float] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)


def client(port: int, headers: dict[str, str], work: "queue.SimpleQueue[bytes]") -> ClientTally:
    tally = ClientTally()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=HTTP_TIMEOUT_S)
    try:
        while True:
            try:
                body = work.get_nowait()
            except queue.Empty:
                return tally
            started = time.perf_counter()
            try:
                conn.request("POST", PATH, body, headers)
                response = conn.getresponse()
                data = response.read()
            except (OSError, http.client.HTTPException) as error:
                tally.refused.append(f"{type(error).__name__}: {error}")
                conn.close()  # the next request reconnects
                continue
            tally.latencies_ms.append((time.perf_counter() - started) * 1000)
            if response.status != 202:
                tally.refused.append(f"{response.status}: {data[:300].decode(errors='replace')}")
                continue
            answer = json.loads(data)
            tally.accepted += answer["accepted"]
            tally.runs.add(answer["run"])
    finally:
        conn.close()


def post_all(stack: Stack, payloads: list[bytes]) -> tuple[float, list[ClientTally]]:
    headers = {"Authorization": f"Bearer {stack.secret}", "Content-Type": "application/json"}
    work: queue.SimpleQueue[bytes] = queue.SimpleQueue()
    for body in payloads:
        work.put(body)
    tallies: list[ClientTally] = [ClientTally() for _ in range(CLIENTS)]

    def run(i: int) -> None:
        tallies[i] = client(stack.port, headers, work)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(CLIENTS)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started, tallies


def ours_round(stack: Stack, payloads: list[bytes], events: int, *, measured: bool) -> Round:
    before_rows, before_msgs = stream_events(stack), broker_messages()
    before_cpu, cpu_started = cpu_seconds(stack.cpu_groups), time.process_time()
    started = time.perf_counter()
    wall, tallies = post_all(stack, payloads)
    result = Round("ours", measured, sum(t.accepted for t in tallies), wall)
    queued = wait_for_messages(before_msgs + result.events) - before_msgs
    result.dispatched_s = time.perf_counter() - started
    result.cpu_s = cpu_used(stack, before_cpu, cpu_started)
    result.latencies_ms = [ms for t in tallies for ms in t.latencies_ms]
    result.refused = [r for t in tallies for r in t.refused]
    runs = {r for t in tallies for r in t.runs}
    if stack.stream_run is None and len(runs) == 1:
        stack.stream_run = runs.pop()
        before_rows = 0  # the first round opened the stream run
    elif runs - {stack.stream_run}:
        raise RuntimeError(f"events went to runs {sorted(runs)}, not only {stack.stream_run}")
    grew = stream_events(stack) - before_rows
    if grew != result.events or queued != result.events:
        raise RuntimeError(
            f"ours: {result.events} events accepted, but the stream run's events grew by"
            f" {grew} and Redis's queues by {queued} messages"
        )
    if not result.refused and result.events != events:
        raise RuntimeError(f"ours: {result.events} events accepted of {events} sent")
    return result


def stream_events(stack: Stack) -> int:
    from apps.runs.models import Event
    from apps.tenants.context import tenant_context

    if stack.stream_run is None:
        return 0
    with tenant_context(stack.tenant):
        return Event.objects.filter(run_id=stack.stream_run).count()


def wait_for_messages(expected: int, timeout_s: float = 300.0) -> int:
    """The broker's message count once the hand-off worker has published everything (or
    what it is when the time is up, which then fails the round's check)."""
    deadline = time.monotonic() + timeout_s
    count = broker_messages()
    while count < expected and time.monotonic() < deadline:
        time.sleep(0.02)
        count = broker_messages()
    return count


def broker_messages() -> int:
    """Messages waiting in the broker's queues (lists in Redis db 0)."""
    import redis
    from django.conf import settings

    client = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    try:
        # The control queue holds hand-offs, not steps: it is not counted.
        lists = [
            k
            for k in client.scan_iter(count=1000)
            if client.type(k) == b"list" and not k.startswith(CONTROL_QUEUE.encode())
        ]
        return sum(int(client.llen(k)) for k in lists)
    finally:
        client.close()


# --- floor: COPY ----------------------------------------------------------------------------


def copy_text(value: Any) -> str:
    """One column of PostgreSQL's COPY text format, from a field's database value."""
    if value is None:
        return "\\N"
    if isinstance(value, bool):
        return "t" if value else "f"
    if isinstance(value, datetime):
        text = value.isoformat()
    elif isinstance(value, list):
        text = "{" + ",".join(str(v) for v in value) + "}"  # uuid[] here: no quoting needed
    elif hasattr(value, "obj"):  # psycopg's Jsonb, from a JSONField
        text = json.dumps(value.obj)
    elif isinstance(value, str | int | float | Decimal | uuid.UUID):
        text = str(value)
    else:
        raise TypeError(f"no COPY text for {type(value).__name__}")
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def columns_of(obj: Any) -> dict[str, str]:
    """Every column Django writes for a new `obj` (as bulk_create does), as COPY text."""
    from django.db import connection

    return {
        f.column: copy_text(f.get_db_prep_save(f.pre_save(obj, add=True), connection))
        for f in type(obj)._meta.concrete_fields
    }


def floor_batches(stack: Stack, events: int) -> tuple[list[str], list[str], list[tuple[str, str]]]:
    """The COPY column lists of runs_event and runs_step, and per batch the COPY text of its
    events and of their steps: rows built as apps.runs.intake builds them, new ids each."""
    from django.utils import timezone

    from apps.graphs.validation import source_node
    from apps.runs.engine.settle import new_step
    from apps.runs.models import Event

    source = source_node(stack.version.spec)
    run, now = stack.floor_run, timezone.now()
    template = Event(
        tenant_id=run.tenant_id, run=run, node_id="input", port="out", key="", payload={},
        event_time=now, seq=0,
    )  # fmt: skip
    event_cols = columns_of(template)
    step_cols = columns_of(new_step(run, source, [template.id], []))
    batches = []
    for start in range(0, events, BATCH):
        event_lines, step_lines = [], []
        for seq, n in enumerate(range(start, min(events, start + BATCH))):
            payload, key = event(n)
            event_id, step_id = uuid.uuid4(), uuid.uuid4()
            row = {**event_cols, "id": str(event_id), "seq": str(seq), "key": copy_text(key)}
            row["payload"] = copy_text(json.dumps(payload))
            event_lines.append("\t".join(row.values()))
            step = {**step_cols, "id": str(step_id), "inputs": "{" + str(event_id) + "}"}
            step_lines.append("\t".join(step.values()))
        batches.append(("\n".join(event_lines) + "\n", "\n".join(step_lines) + "\n"))
    return list(event_cols), list(step_cols), batches


def copy_all(event_cols: list[str], step_cols: list[str], batches: list[tuple[str, str]]) -> float:
    import psycopg

    into_events = f"COPY runs_event ({', '.join(event_cols)}) FROM STDIN"
    into_steps = f"COPY runs_step ({', '.join(step_cols)}) FROM STDIN"
    work: queue.SimpleQueue[tuple[str, str]] = queue.SimpleQueue()
    for batch in batches:
        work.put(batch)
    conns = [psycopg.connect(os.environ["DATABASE_URL"]) for _ in range(CLIENTS)]
    errors: list[BaseException] = []

    def run(conn: psycopg.Connection[Any]) -> None:
        try:
            with conn.cursor() as cur:
                while True:
                    try:
                        event_text, step_text = work.get_nowait()
                    except queue.Empty:
                        return
                    with conn.transaction():
                        with cur.copy(into_events) as copy:
                            copy.write(event_text)
                        with cur.copy(into_steps) as copy:
                            copy.write(step_text)
        except BaseException as error:  # reported by the caller, which fails the run
            errors.append(error)

    threads = [threading.Thread(target=run, args=(conn,)) for conn in conns]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    for conn in conns:
        conn.close()
    if errors:
        raise RuntimeError(f"floor: COPY failed: {errors[0]!r}")
    return wall


def floor_round(stack: Stack, events: int, *, measured: bool) -> Round:
    event_cols, step_cols, batches = floor_batches(stack, events)
    before_cpu, cpu_started = cpu_seconds(stack.cpu_groups), time.process_time()
    wall = copy_all(event_cols, step_cols, batches)
    result = Round("floor", measured, events, wall)
    result.cpu_s = cpu_used(stack, before_cpu, cpu_started)
    written = floor_rows(stack)
    if written != (events, events):
        raise RuntimeError(f"floor: {events} events copied, found (events, steps) {written}")
    clear_floor(stack)
    return result


def floor_rows(stack: Stack) -> tuple[int, int]:
    from apps.runs.models import Event, Step
    from apps.tenants.context import tenant_context

    with tenant_context(stack.tenant):
        run = stack.floor_run.id
        return Event.objects.filter(run_id=run).count(), Step.objects.filter(run_id=run).count()


def clear_floor(stack: Stack) -> None:
    from django.db import connection

    with connection.cursor() as cursor:
        for table in ("runs_event", "runs_step"):
            cursor.execute(f"DELETE FROM {table} WHERE run_id = %s", [stack.floor_run.id])
        cursor.execute("VACUUM ANALYZE runs_event, runs_step")


# --- setup and figures ----------------------------------------------------------------------


def cpu_used(stack: Stack, before: dict[str, float], own_started: float) -> dict[str, float]:
    after = cpu_seconds(stack.cpu_groups)
    used = {name: after[name] - before[name] for name in after}
    used["bench"] = time.process_time() - own_started
    return used


def setup(port: int, asgi_pid: int, worker_pid: int, root: Any) -> Stack:
    from apps.graphs.services import create_graph
    from apps.runs.intake import start_batch
    from apps.tenants.api_keys import create_api_key
    from apps.tenants.context import tenant_context
    from apps.tenants.keys import EVENTS_WRITE
    from apps.tenants.models import Tenant
    from apps.tenants.services import create_tenant

    tenant = create_tenant(slug="bench", name="Bench", actor="bench")
    Tenant.objects.filter(pk=tenant.pk).update(**LIMITS)
    _, secret = create_api_key(tenant=tenant, name="ingest", scopes=[EVENTS_WRITE], actor="bench")
    with tenant_context(tenant):
        graph = create_graph(slug=SLUG, name="Clicks", spec=SPEC, actor="bench")
        version = graph.deployed_version
        assert version is not None  # a new graph's first version is deployed
        floor_run = start_batch(
            version=version, items=[], actor="bench", budget_usd=None, deadline_s=None
        )
    redis_pid = int((root / "redis" / "redis.pid").read_text().strip())
    postmaster = embedded.postmaster_pid(root / "pg")
    groups = {
        "asgi": [asgi_pid],
        "postgres": [postmaster] if postmaster else [],
        "redis": [redis_pid],
        "worker": [worker_pid],
    }
    return Stack(port, secret, tenant, version, floor_run, groups)


def side_rate(rounds: list[Round], side: str) -> float:
    return statistics.median(r.rate for r in rounds if r.measured and r.side == side)


def figures(rounds: list[Round], events: int) -> dict[str, Any]:
    ours, floor = side_rate(rounds, "ours"), side_rate(rounds, "floor")
    latencies = [ms for r in rounds if r.measured and r.side == "ours" for ms in r.latencies_ms]
    result: dict[str, Any] = {
        "bench": "ingest",
        "events": events,
        "events_per_s": round(ours, 1),
        "floor_events_per_s": round(floor, 1),
        "ratio_vs_floor": round(ours / floor, 3),
        "dispatched_events_per_s": round(
            statistics.median(
                r.events / r.dispatched_s
                for r in rounds
                if r.measured and r.side == "ours" and r.dispatched_s
            ),
            1,
        ),
        "batch": BATCH,
        "clients": CLIENTS,
        "rounds": sum(r.measured and r.side == "ours" for r in rounds),
        "rate_is": "median over rounds",
        "request_ms_p50": rounded(pct(latencies, 0.5), 1),
        "request_ms_p99": rounded(pct(latencies, 0.99), 1),
        "refused": sum(len(r.refused) for r in rounds),
        "input_schema": True,
        "web_processes": 1,
    }
    for side in ("ours", "floor"):
        measured = [r for r in rounds if r.measured and r.side == side]
        wall = sum(r.wall_s for r in measured)
        prefix = "" if side == "ours" else "floor_"
        result[f"{prefix}events_per_s_by_round"] = [round(r.rate, 1) for r in measured]
        for name in measured[0].cpu_s:
            cores = sum(r.cpu_s[name] for r in measured) / wall
            result[f"{prefix}cpu_cores_{name}"] = round(cores, 2)
    return result


def print_table(rounds: list[Round], result: dict[str, Any]) -> None:
    print(
        f"{CLIENTS} concurrent clients, {BATCH} events per request (ours) or per COPY"
        f" transaction (floor), {result['events']} events per round; one uvicorn process"
    )
    names = list(rounds[0].cpu_s)
    head = "".join(f"{'cpu ' + n:>14}" for n in names)
    print(f"{'round':<8}{'events':>8}{'wall s':>8}{'events/s':>10}{'p50 ms':>8}{'p99 ms':>8}{head}")
    for r in rounds:
        label = r.side if r.measured else f"{r.side}*"
        p50, p99 = pct(r.latencies_ms, 0.5), pct(r.latencies_ms, 0.99)
        cpu = "".join(f"{r.cpu_s[n] / r.wall_s:>14.2f}" for n in names)
        print(
            f"{label:<8}{r.events:>8}{r.wall_s:>8.2f}{r.rate:>10.0f}"
            f"{'-' if p50 is None else f'{p50:.0f}':>8}{'-' if p99 is None else f'{p99:.0f}':>8}"
            f"{cpu}"
        )
    print("(* warm-up, not counted; cpu columns: cores used on average over the round)")
    print(
        f"ours {result['events_per_s']} events/s, floor {result['floor_events_per_s']} events/s"
        f" (medians over rounds): ratio {result['ratio_vs_floor']}"
    )
    for r in rounds:
        for refusal in r.refused[:5]:
            print(f"  {r.side}: refused: {refusal}")


def main(*, quick: bool) -> int:
    events, rounds_per_side = SIZES["quick" if quick else "full"]
    payloads, warm_payloads = bodies(events), bodies(WARM_UP_EVENTS)
    rounds: list[Round] = []
    with services("ingest") as root:
        asgi, port = start_asgi(root)
        # Two processes, as `make run` gives its CPU worker (which also consumes control).
        worker = start_worker(root, "control", [CONTROL_QUEUE], [], concurrency=2)
        try:
            stack = setup(port, asgi.pid, worker.pid, root)
            rounds.append(ours_round(stack, warm_payloads, WARM_UP_EVENTS, measured=False))
            rounds.append(floor_round(stack, WARM_UP_EVENTS, measured=False))
            for _ in range(rounds_per_side):
                rounds.append(ours_round(stack, payloads, events, measured=True))
                rounds.append(floor_round(stack, events, measured=True))
        finally:
            processes.stop_all([asgi, worker])
            logs = keep_logs(root)
    result = figures(rounds, events)
    print_table(rounds, result)
    print(f"logs: {logs}")
    print("RESULT " + json.dumps(result))
    return 1 if result["refused"] else 0
