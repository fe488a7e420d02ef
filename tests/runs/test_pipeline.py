"""End to end on real worker processes: the fan-out / fan-in pipeline from issue 2."""

from collections import Counter
from decimal import Decimal

import pytest

from apps.runs.models import Event, ResultRow, RunStatus, Step, StepStatus
from apps.runs.services import start_run
from apps.tenants.context import tenant_context
from tests.conftest import World
from tests.runs.helpers import wait_for_run

pytestmark = [pytest.mark.workers, pytest.mark.django_db(transaction=True)]

FANOUT_SPEC = {
    "nodes": [
        {"id": "in", "type": "source.manual"},
        {"id": "split", "type": "fanout.split", "config": {"field": "words", "max_items": 100}},
        {
            "id": "shout",
            "type": "transform.template",
            "config": {"template": "{{ item | upper }}-{{ index }}", "output": "loud"},
        },
        {"id": "each", "type": "sink.table", "config": {"table": "loud_words"}},
        {"id": "gather", "type": "collect", "config": {"by": "split"}},
        {
            "id": "joined",
            "type": "transform.template",
            "config": {
                "template": "{{ items | map(attribute='loud') | join(',') }}",
                "output": "all",
            },
        },
        {"id": "store", "type": "sink.table", "config": {"table": "digests"}},
    ],
    "edges": [
        ["in", "split"],
        ["split", "shout"],
        ["shout", "each"],
        ["shout", "gather"],
        ["gather", "joined"],
        ["joined", "store"],
    ],
}


def test_fanout_template_collect_sink_gives_exactly_the_expected_rows(
    world: World, platform: object
) -> None:
    graph = world.graph("fanout", FANOUT_SPEC)
    words = [f"w{i}" for i in range(50)]
    with tenant_context(world.acme):
        run = start_run(version=graph.live_version(), payload={"words": words}, actor=world.owner)
    run = wait_for_run(run)

    with tenant_context(world.acme):
        assert run.status == RunStatus.SUCCEEDED, run.error
        expected = [f"W{i}-{i}" for i in range(50)]
        each = ResultRow.objects.filter(run=run, table="loud_words")
        assert sorted(row.data["loud"] for row in each) == sorted(expected)
        digest = ResultRow.objects.get(run=run, table="digests")
        assert digest.data["all"] == ",".join(expected)  # collect keeps the fan-out's order
        assert digest.data["count"] == 50

        steps = Counter(Step.objects.filter(run=run).values_list("node_id", flat=True))
        assert steps == {
            "in": 1,
            "split": 1,
            "shout": 50,
            "each": 50,
            "gather": 1,
            "joined": 1,
            "store": 1,
        }
        assert set(Step.objects.filter(run=run).values_list("status", flat=True)) == {
            StepStatus.DONE
        }
        assert Event.objects.filter(run=run, producer__node_id="split").count() == 50
        run.refresh_from_db()
        assert run.open_steps == 0


def test_route_switch_sends_each_event_down_one_branch(world: World, platform: object) -> None:
    spec = {
        "nodes": [
            {"id": "in", "type": "source.manual"},
            {
                "id": "route",
                "type": "route.switch",
                "config": {"field": "kind", "cases": {"a": "left"}, "default": "right"},
            },
            {"id": "l", "type": "sink.table", "config": {"table": "lefts"}},
            {"id": "r", "type": "sink.table", "config": {"table": "rights"}},
        ],
        "edges": [["in", "route"], ["route", "l", "left"], ["route", "r", "right"]],
    }
    graph = world.graph("switch", spec)
    with tenant_context(world.acme):
        runs = [
            start_run(version=graph.live_version(), payload={"kind": k}, actor=world.owner)
            for k in ("a", "b")
        ]
    for run in runs:
        assert wait_for_run(run).status == RunStatus.SUCCEEDED
    with tenant_context(world.acme):
        assert [r.table for r in ResultRow.objects.filter(run=runs[0])] == ["lefts"]
        assert [r.table for r in ResultRow.objects.filter(run=runs[1])] == ["rights"]


def test_a_permanent_error_dead_letters_the_step_and_fails_the_run(
    world: World, platform: object
) -> None:
    spec = {
        "nodes": [
            {"id": "in", "type": "source.manual"},
            {"id": "split", "type": "fanout.split", "config": {"field": "items"}},
            {"id": "store", "type": "sink.table", "config": {"table": "never"}},
        ],
        "edges": [["in", "split"], ["split", "store"]],
    }
    graph = world.graph("bad-input", spec)
    with tenant_context(world.acme):
        run = start_run(
            version=graph.live_version(), payload={"items": "not a list"}, actor=world.owner
        )
    run = wait_for_run(run)
    with tenant_context(world.acme):
        assert run.status == RunStatus.FAILED
        split = Step.objects.get(run=run, node_id="split")
        assert split.status == StepStatus.DEAD
        assert split.attempt == 1  # permanent: not retried
        assert split.error == "attempt 1/3: field 'items' must be a list, got str"
        assert "split: attempt 1/3" in run.error
        assert not ResultRow.objects.filter(run=run).exists()


def test_llm_generate_on_the_simulated_engine_records_usage(world: World, platform: object) -> None:
    spec = {
        "nodes": [
            {"id": "in", "type": "source.manual"},
            {
                "id": "gen",
                "type": "llm.generate",
                "config": {"prompt": "Say {{ word }}", "max_tokens": 8},
            },
            {"id": "store", "type": "sink.table", "config": {"table": "texts"}},
        ],
        "edges": [["in", "gen"], ["gen", "store"]],
    }
    graph = world.graph("gen", spec)
    with tenant_context(world.acme):
        first = start_run(version=graph.live_version(), payload={"word": "hi"}, actor=world.owner)
        second = start_run(version=graph.live_version(), payload={"word": "hi"}, actor=world.owner)
    for run in (first, second):
        assert wait_for_run(run).status == RunStatus.SUCCEEDED
    with tenant_context(world.acme):
        texts = [ResultRow.objects.get(run=r).data["text"] for r in (first, second)]
        assert texts[0] == texts[1]  # the simulated engine is a pure function of the prompt
        words = len(texts[0].split())
        assert 4 <= words <= 8  # half to all of max_tokens
        step = Step.objects.get(run=first, node_id="gen")
        assert step.queue == "gpu.default" and step.tokens_out == words
        assert step.model == "default" and step.wasted_tokens == 0
        usage = step.usage.get()
        assert (usage.engine, usage.tokens_in, usage.tokens_out) == ("simulated", 2, words)
        # default's illustrative prices: $0.50 per million prompt, $1.50 per million completion
        expected = (Decimal(2) * Decimal("0.50") + words * Decimal("1.50")) / 1_000_000
        assert usage.cost_usd == step.cost_usd == expected.quantize(Decimal("0.000001"))


def test_collect_waits_for_items_routed_elsewhere_and_fires_on_an_empty_fanout(
    world: World, platform: object
) -> None:
    spec = {
        "nodes": [
            {"id": "in", "type": "source.manual"},
            {"id": "split", "type": "fanout.split", "config": {"field": "items"}},
            {
                "id": "route",
                "type": "route.switch",
                "config": {"field": "item", "cases": {"true": "keep"}, "default": "drop"},
            },
            {"id": "dropped", "type": "sink.table", "config": {"table": "dropped"}},
            {"id": "gather", "type": "collect", "config": {"by": "split"}},
            {"id": "store", "type": "sink.table", "config": {"table": "kept"}},
        ],
        "edges": [
            ["in", "split"],
            ["split", "route"],
            ["route", "gather", "keep"],
            ["route", "dropped", "drop"],
            ["gather", "store"],
        ],
    }
    graph = world.graph("routed-fanin", spec)
    with tenant_context(world.acme):
        mixed = start_run(
            version=graph.live_version(),
            payload={"items": [True, False, True, False, False]},
            actor=world.owner,
        )
        empty = start_run(version=graph.live_version(), payload={"items": []}, actor=world.owner)
    for run in (mixed, empty):
        assert wait_for_run(run).status == RunStatus.SUCCEEDED
    with tenant_context(world.acme):
        kept = ResultRow.objects.get(run=mixed, table="kept").data
        assert [item["index"] for item in kept["items"]] == [0, 2]
        assert ResultRow.objects.filter(run=mixed, table="dropped").count() == 3
        assert ResultRow.objects.get(run=empty, table="kept").data == {"items": [], "count": 0}


def test_nested_fanouts_collect_inner_then_outer(world: World, platform: object) -> None:
    spec = {
        "nodes": [
            {"id": "in", "type": "source.manual"},
            {"id": "rows", "type": "fanout.split", "config": {"field": "grid"}},
            {"id": "cells", "type": "fanout.split", "config": {"field": "item"}},
            {
                "id": "double",
                "type": "transform.template",
                "config": {"template": "{{ item * 2 }}", "output": "v"},
            },
            {"id": "row", "type": "collect", "config": {"by": "cells"}},
            {
                "id": "sum",
                "type": "transform.template",
                "config": {
                    "template": "{{ items | map(attribute='v') | join('+') }}",
                    "output": "s",
                },
            },
            {"id": "grid", "type": "collect", "config": {"by": "rows"}},
            {"id": "store", "type": "sink.table", "config": {"table": "grids"}},
        ],
        "edges": [
            ["in", "rows"],
            ["rows", "cells"],
            ["cells", "double"],
            ["double", "row"],
            ["row", "sum"],
            ["sum", "grid"],
            ["grid", "store"],
        ],
    }
    graph = world.graph("nested", spec)
    with tenant_context(world.acme):
        run = start_run(
            version=graph.live_version(),
            payload={"grid": [[1, 2], [], [3, 4, 5]]},
            actor=world.owner,
        )
    assert wait_for_run(run).status == RunStatus.SUCCEEDED
    with tenant_context(world.acme):
        grid = ResultRow.objects.get(run=run).data
        assert [row["s"] for row in grid["items"]] == ["2+4", "", "6+8+10"]


def test_an_outer_collect_waits_for_an_uncollected_inner_fanout(
    world: World, platform: object
) -> None:
    spec = {
        "nodes": [
            {"id": "in", "type": "source.manual"},
            {"id": "rows", "type": "fanout.split", "config": {"field": "grid"}},
            {"id": "cells", "type": "fanout.split", "config": {"field": "item"}},
            {
                "id": "double",
                "type": "transform.template",
                "config": {"template": "{{ item * 2 }}", "output": "v"},
            },
            {"id": "all", "type": "collect", "config": {"by": "rows"}},
            {"id": "store", "type": "sink.table", "config": {"table": "flat"}},
        ],
        "edges": [
            ["in", "rows"],
            ["rows", "cells"],
            ["cells", "double"],
            ["double", "all"],
            ["all", "store"],
        ],
    }
    graph = world.graph("flatten", spec)
    with tenant_context(world.acme):
        run = start_run(
            version=graph.live_version(), payload={"grid": [[1, 2], [], [3]]}, actor=world.owner
        )
    assert wait_for_run(run).status == RunStatus.SUCCEEDED
    with tenant_context(world.acme):
        flat = ResultRow.objects.get(run=run).data
        assert [cell["v"] for cell in flat["items"]] == ["2", "4", "6"]  # row order, then cell
