"""The claim and the commit in one statement each (store.claim_at_once, commit_at_once):
they write exactly what the general path writes, and where their case does not hold they
write nothing and leave it to the general path."""

import uuid
from typing import Any

import pytest
from django.db import connection
from django.db.models import Model
from django.test.utils import CaptureQueriesContext

from apps.audit.models import AuditEntry
from apps.runs.engine import store
from apps.runs.engine.context import Claimed
from apps.runs.engine.execute import claim_step, run_claimed
from apps.runs.models import Event, FanIn, FanInClosed, Run, RunStatus, Step, StepStatus
from apps.runs.services import InvalidInput, start_run
from apps.tenants.context import tenant_context
from apps.tenants.models import Tenant
from tests.conftest import World
from tests.runs.engine.helpers import FANOUT_SPEC, WORKER, begin, claim, drain, only_step

# A payload that JSON and PostgreSQL must both carry intact.
AWKWARD = {"text": 'naïve — ∑ "quoted" \\ back', "n": 3, "nested": [1.5, None, True, {}]}


def unchained(**extra: Any) -> dict[str, Any]:
    """in -> a -> b, every node set not to chain: each step commits on its own."""
    nodes: list[dict[str, Any]] = [
        {"id": "in", "type": "source.manual", "chain": False},
        {
            "id": "a",
            "type": "transform.template",
            "config": {"template": "{{ text }}|{{ n }}", "output": "text"},
            "chain": False,
            **extra,
        },
        {
            "id": "b",
            "type": "transform.template",
            "config": {"template": "{{ text }}!", "output": "text"},
            "chain": False,
        },
    ]
    return {"nodes": nodes, "edges": [["in", "a"], ["a", "b"]]}


def row(obj: Model) -> dict[str, Any]:
    return {f.attname: getattr(obj, f.attname) for f in type(obj)._meta.concrete_fields}


@pytest.mark.django_db
def test_the_one_statement_commit_writes_the_rows_the_orm_would(world: World) -> None:
    run = begin(world, "rows", unchained(ttl_s=600), AWKWARD)
    with tenant_context(world.acme):
        first = claim(only_step(run, "in"))
        following = run_claimed(first, inline_queue="cpu")
        # Written leased to this worker by the source's commit, in the one statement.
        assert following is not None and following.step.node_id == "a"
        written = Step.objects.get(id=following.step.id)
        assert row(written) == row(following.step)
        assert written.status == StepStatus.RUNNING and written.deadline is not None
        assert written.created_at is not None and written.inputs == following.step.inputs

        (event,) = Event.objects.filter(producer_id=first.step.id)
        assert event.payload == AWKWARD and event.scopes == [] and event.created_at is not None
        assert following.events is not None
        assert row(event) == row(following.events[0]) | {"created_at": event.created_at}

        source = Step.objects.get(id=first.step.id)
        assert source.status == StepStatus.DONE and source.lease_until is None
        assert source.finished_at is not None and source.operator_ms is not None
        run.refresh_from_db()
        assert run.status == RunStatus.RUNNING and run.open_steps == 1


@pytest.mark.django_db
def test_a_run_whose_last_step_commits_in_one_statement_succeeds(world: World) -> None:
    run = begin(world, "ends", unchained(), {"text": "hi", "n": 1})
    with tenant_context(world.acme):
        claimed: Claimed | None = claim(only_step(run, "in"))
        while claimed is not None:
            claimed = run_claimed(claimed, inline_queue="cpu")
        run.refresh_from_db()
        assert run.status == RunStatus.SUCCEEDED and run.open_steps == 0
        assert run.finished_at is not None
        last = only_step(run, "b")
        assert last.status == StepStatus.DONE
        (out,) = Event.objects.filter(producer=last)
        assert out.payload == {"text": "hi|1!", "n": 1}


@pytest.mark.django_db
def test_a_commit_without_the_lease_writes_nothing(world: World) -> None:
    run = begin(world, "lost", unchained(), {"text": "x", "n": 0})
    with tenant_context(world.acme):
        claimed = claim(only_step(run, "in"))
        # Another worker took the step over meanwhile (the sweeper re-leased it).
        Step.objects.filter(id=claimed.step.id).update(lease_token=None)
        assert run_claimed(claimed, inline_queue="cpu") is None
        assert not Event.objects.filter(producer_id=claimed.step.id).exists()
        assert Step.objects.filter(run=run).count() == 1
        assert Step.objects.get(id=claimed.step.id).status == StepStatus.RUNNING
        assert Run.objects.get(id=run.id).open_steps == 1


@pytest.mark.django_db
def test_the_last_step_of_a_run_with_failures_ends_it_failed_by_name(world: World) -> None:
    """The one-statement commit cannot name the failures, so it stands aside and the
    general path ends the run failed with the error listing them."""
    run = begin(world, "fails", unchained(), {"text": "x", "n": 0})
    with tenant_context(world.acme):
        drain(run, until="b")
        b = only_step(run, "b")
        # As if a branch beside this one had died: a dead step and the run's count of it.
        Step.objects.filter(id=only_step(run, "a").id).update(status=StepStatus.DEAD, error="boom")
        Run.objects.filter(id=run.id).update(failures=1)
        run_claimed(claim(b), inline_queue=None)
        run.refresh_from_db()
        assert run.status == RunStatus.FAILED and "a: boom" in run.error
        assert only_step(run, "b").status == StepStatus.DONE


@pytest.mark.django_db
def test_the_one_statement_claim_takes_a_step_once_and_starts_the_run(world: World) -> None:
    run = begin(world, "claims", unchained(), {})
    with tenant_context(world.acme):
        step = only_step(run, "in")
        claimed = store.claim_at_once(
            step.id,
            world.acme.id,
            token=uuid.uuid4(),
            worker=WORKER,
            now=step.created_at,
            until=step.created_at,
        )
        assert claimed is not None
        taken, started, inputs = claimed
        assert row(taken) == row(Step.objects.get(id=step.id))
        assert [row(e) for e in inputs] == [row(Event.objects.get(id=i)) for i in step.inputs]
        assert taken.status == StepStatus.RUNNING and taken.attempt == 1
        assert started.status == RunStatus.RUNNING and started.started_at is not None
        assert Run.objects.get(id=run.id).status == RunStatus.RUNNING
        # Taken: neither path claims it again.
        assert claim_step(step.id, "other") is None


@pytest.mark.django_db
def test_no_claim_reaches_a_step_of_another_tenant(world: World) -> None:
    run = begin(world, "mine", unchained(), {})
    with tenant_context(world.acme):
        step = only_step(run, "in")
    with tenant_context(world.globex):
        assert claim_step(step.id, WORKER) is None
    with tenant_context(world.acme):
        assert Step.objects.get(id=step.id).status == StepStatus.QUEUED


@pytest.mark.django_db
def test_an_item_of_a_fan_out_commits_in_one_statement_until_its_scope_settles(
    world: World,
) -> None:
    run = begin(world, "items", FANOUT_SPEC, {"items": [{"name": n} for n in "abc"]})
    with tenant_context(world.acme):
        drain(run, until="shape")
        split = only_step(run, "split")
        items = [claim(only_step(run, "shape", item)) for item in range(3)]
        for done, item in enumerate(items[:2], 1):
            with CaptureQueriesContext(connection) as queries:
                assert run_claimed(item, inline_queue=None) is None
            assert len(queries) == 1, [q["sql"][:60] for q in queries]
            fanin = FanIn.objects.get(fanout_step=split)
            assert fanin.pending == 3 - done and fanin.closed == FanInClosed.OPEN
            assert fanin.arrivals.count() == done
            assert Run.objects.get(id=run.id).open_steps == 3 - done
        # The last item settles the scope: the general path fires the collect.
        run_claimed(items[2], inline_queue=None)
        fanin.refresh_from_db()
        assert fanin.pending == 0 and fanin.closed == FanInClosed.COLLECTED
        gather = only_step(run, "gather")
        arrived = list(fanin.arrivals.order_by("id").values_list("event_id", flat=True))
        assert sorted(gather.inputs) == sorted(arrived) and len(arrived) == 3
        drain(run)
        run.refresh_from_db()
        assert run.status == RunStatus.SUCCEEDED


@pytest.mark.django_db
def test_a_run_starts_in_one_statement_with_its_event_source_step_and_audit_entry(
    world: World,
) -> None:
    version = world.graph("starts", unchained()).live_version()
    statements: list[str] = []

    def record(execute: Any, sql: str, *args: Any) -> Any:
        statements.append(sql)
        return execute(sql, *args)

    with tenant_context(world.acme), connection.execute_wrapper(record):
        run = start_run(version=version, payload={"text": "x", "n": 1}, actor=world.owner)
    assert len([sql for sql in statements if "INSERT" in sql or "UPDATE" in sql]) == 1
    with tenant_context(world.acme):
        saved = Run.objects.get(id=run.id)
        assert row(saved) | {"input": run.input} == row(run)
        assert saved.open_steps == 1 and saved.status == RunStatus.QUEUED
        (event,) = Event.objects.filter(run=run)
        assert event.payload == {"text": "x", "n": 1} and event.producer_id is None
        source = only_step(run, "in")
        assert source.inputs == [event.id] and source.status == StepStatus.QUEUED
    entry = AuditEntry.unscoped_all_tenants.get(action="run.start", target_id=str(run.id))
    assert entry.tenant_id == world.acme.id and entry.actor_id == world.owner.pk
    assert entry.after == {"graph": "starts", "version": 1, "kind": "interactive"}


@pytest.mark.django_db
def test_a_tenant_with_run_quotas_starts_runs_in_the_checked_transaction(world: World) -> None:
    version = world.graph("quota", unchained()).live_version()
    Tenant.objects.filter(id=world.acme.id).update(max_active_runs=1)
    with tenant_context(world.acme):
        first = start_run(version=version, payload={}, actor=world.owner)
        assert only_step(first, "in").status == StepStatus.QUEUED
        assert Run.objects.get(id=first.id).open_steps == 1
        with pytest.raises(InvalidInput, match="limit is 1"):
            start_run(version=version, payload={}, actor=world.owner)
        assert Run.objects.count() == 1


@pytest.mark.django_db
def test_a_wide_fan_out_copies_its_items_in_and_collects_every_one(world: World) -> None:
    """Past store.COPY_FROM rows, a fan-out's events and item steps are written by COPY."""
    names = [f"n{i}" for i in range(store.COPY_FROM + 2)]
    run = begin(world, "wide", FANOUT_SPEC, {"items": [{"name": n} for n in names]})
    drain(run)
    run.refresh_from_db()
    assert run.status == RunStatus.SUCCEEDED
    with tenant_context(world.acme):
        split = only_step(run, "split")
        items = Event.objects.filter(producer=split).order_by("seq")
        assert [e.payload["item"]["name"] for e in items] == names
        assert all(e.scopes == [[str(split.id), e.seq, "split"]] for e in items)
        shaped = Step.objects.filter(run=run, node_id="shape")
        assert sorted(shaped.values_list("item_index", flat=True)) == list(range(len(names)))
        (out,) = Event.objects.filter(producer=only_step(run, "gather"))
        assert len(out.payload["items"]) == len(names)
