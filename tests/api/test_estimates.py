"""The pre-flight estimate (apps/api/estimates.py): pure figures from hand-built specs, the
profile's validation, and estimate beside actual on the database and on real workers."""

import json
import math
from dataclasses import replace
from decimal import Decimal
from typing import Any

import pytest

from apps.api.estimates import InputProfile, estimate_spec, estimate_version, parse_profile
from apps.api.measured import Capacity, NodeHistory, actual_for_run
from apps.graphs.services import add_version
from apps.runs.models import RunStatus, Step
from apps.runs.services import start_run
from apps.tenants.context import tenant_context
from tests.conftest import World
from tests.runs.helpers import wait_for_run
from workers.inference.registry import ModelSpec

CAPACITY = Capacity(
    cpu_concurrency=2, gpu_concurrency=32, ttft_ms=150.0, tokens_per_s=80.0, batch_capacity=64
)
PRICES = {
    "default": ModelSpec("default", "simulated", {}, Decimal("0.5"), Decimal("1.5"), 2),
    "small": ModelSpec(
        "small", "simulated", {"tokens_per_s_factor": 2.0}, Decimal("0.1"), Decimal("0.4"), 1
    ),
}
PROMPT = "Summarise this page: {{ item }}"  # 31 characters: 8 tokens at 4 characters a token

SOURCE = {"id": "in", "type": "source.manual"}
SPLIT = {"id": "pages", "type": "fanout.split", "config": {"field": "pages"}}
CLEAN = {"id": "clean", "type": "transform.template", "config": {"template": "{{ item }}"}}
SUMMARY = {
    "id": "summary",
    "type": "llm.generate",
    "config": {"prompt": PROMPT, "max_tokens": 400},
}
GATHER = {"id": "gather", "type": "collect", "config": {"by": "pages"}}

PAGES_SPEC: dict[str, Any] = {
    "nodes": [SOURCE, SPLIT, CLEAN, SUMMARY, GATHER],
    "edges": [["in", "pages"], ["pages", "clean"], ["clean", "summary"], ["summary", "gather"]],
}


def estimate(
    spec: dict[str, Any],
    profile: InputProfile,
    history: dict[str, NodeHistory] | None = None,
    capacity: Capacity = CAPACITY,
) -> dict[str, Any]:
    return estimate_spec(spec, profile, history=history or {}, capacity=capacity, prices=PRICES)


def llm(node_id: str, **config: Any) -> dict[str, Any]:
    return {"id": node_id, "type": "llm.generate", "config": {"prompt": PROMPT, **config}}


def template(node_id: str) -> dict[str, Any]:
    return {"id": node_id, "type": "transform.template", "config": {"template": "{{ item }}"}}


# -- steps --------------------------------------------------------------------------------


def test_twenty_thousand_ten_page_items_take_469200_steps() -> None:
    result = estimate(PAGES_SPEC, InputProfile(items=20_000, pages_per_item=10))

    # 20,000 + 20,000 + 200,000 + 200,000 + 20,000 = 460,000, and 2% for retries.
    assert result["steps"]["total"] == 469_200
    assert result["steps"]["per_node"] == {
        "in": 20_400,
        "pages": 20_400,
        "clean": 204_000,
        "summary": 204_000,
        "gather": 20_400,
    }
    assert "steps include 2% for retries" in result["assumptions"]
    assert json.loads(json.dumps(result)) == result


def test_a_switch_divides_its_events_evenly_among_its_ports_and_default() -> None:
    switch = {
        "id": "route",
        "type": "route.switch",
        "config": {"field": "lang", "cases": {"en": "english", "fr": "french"}, "default": "rest"},
    }
    spec = {
        "nodes": [SOURCE, switch, template("a"), template("b"), template("c")],
        "edges": [
            ["in", "route"],
            ["route", "a", "english"],
            ["route", "b", "french"],
            ["route", "c", "rest"],
        ],
    }

    result = estimate(spec, InputProfile(items=3_000))

    assert result["steps"]["per_node"] == {
        "in": 3060,
        "route": 3060,
        "a": 1020,
        "b": 1020,
        "c": 1020,
    }
    switch_notes = [note for note in result["assumptions"] if note.startswith("switch 'route'")]
    assert switch_notes == [
        "switch 'route': its events divided evenly among its 3 ports"
        " (english, french, rest, default 'rest' included)"
    ]


def test_a_collect_closes_its_fan_out_and_nested_fan_outs_multiply() -> None:
    docs = {"id": "docs", "type": "fanout.split", "config": {"field": "docs"}}
    inner = {"id": "pages", "type": "fanout.split", "config": {"field": "pages"}}
    pages_done = {"id": "pages_done", "type": "collect", "config": {"by": "pages"}}
    docs_done = {"id": "docs_done", "type": "collect", "config": {"by": "docs"}}
    spec = {
        "nodes": [SOURCE, docs, inner, template("page"), pages_done, docs_done, template("after")],
        "edges": [
            ["in", "docs"],
            ["docs", "pages"],
            ["pages", "page"],
            ["page", "pages_done"],
            ["pages_done", "docs_done"],
            ["docs_done", "after"],
        ],
    }

    result = estimate(spec, InputProfile(items=100, pages_per_item=10, fanout={"docs": 4}))

    multiplicity = {"in": 100, "docs": 100, "pages": 400, "page": 4000, "pages_done": 400}
    multiplicity |= {"docs_done": 100, "after": 100}
    assert result["steps"]["per_node"] == {
        node_id: math.ceil(count * 1.02) for node_id, count in multiplicity.items()
    }
    assert "split 'docs': 4 items per event (fanout)" in result["assumptions"]
    assert "split 'pages': 10 items per event (pages_per_item)" in result["assumptions"]


def test_a_collect_fires_once_per_fan_out_even_when_a_switch_drops_some_items() -> None:
    switch = {
        "id": "keep",
        "type": "route.switch",
        "config": {"field": "ok", "cases": {"true": "yes", "false": "no"}},
    }
    spec = {
        "nodes": [SOURCE, SPLIT, switch, template("kept"), GATHER],
        "edges": [
            ["in", "pages"],
            ["pages", "keep"],
            ["keep", "kept", "yes"],
            ["kept", "gather"],
        ],
    }

    per_node = estimate(spec, InputProfile(items=50, pages_per_item=10))["steps"]["per_node"]

    assert per_node["kept"] == 255  # half of 500 pages
    assert per_node["gather"] == 51  # one per item all the same: the fan-in closes regardless


def test_a_fanout_for_a_node_that_is_not_a_split_is_refused() -> None:
    with pytest.raises(ValueError, match=r"fanout.clean: the graph has no fanout.split node"):
        estimate(PAGES_SPEC, InputProfile(items=1, fanout={"clean": 3}))


# -- tokens, cost, engine seconds ---------------------------------------------------------


def test_a_page_reads_its_share_of_the_item_and_after_the_collect_the_whole_item() -> None:
    spec = {
        "nodes": [*PAGES_SPEC["nodes"], llm("overall", max_tokens=100)],
        "edges": [*PAGES_SPEC["edges"], ["gather", "overall"]],
    }
    profile = InputProfile(items=1_000, pages_per_item=10, tokens_per_item=8_000)

    result = estimate(spec, profile)

    # A page is a tenth of 8,000 tokens; the prompt template adds 8 (31 characters / 4).
    page_prompt, whole_prompt = 8 + 800, 8 + 8_000
    assert result["tokens"] == {
        "in": 10_200 * page_prompt + 1_020 * whole_prompt,
        "out": 10_200 * 400 + 1_020 * 100,
    }
    assert "llm 'summary': 808 prompt tokens per call" in " ".join(result["assumptions"])
    assert "an input item is 8000 prompt tokens (tokens_per_item)" in result["assumptions"]


def test_without_tokens_per_item_a_page_is_500_tokens() -> None:
    result = estimate(PAGES_SPEC, InputProfile(items=10, pages_per_item=4))

    assert result["tokens"]["in"] == 41 * (8 + 500)  # 40 pages, 2% for retries, rounded up
    assert (
        "an input item is 2000 prompt tokens (500 a page x 4 pages; tokens_per_item not given)"
        in result["assumptions"]
    )


def test_cost_is_priced_per_million_tokens_with_six_decimals() -> None:
    spec = {
        "nodes": [SOURCE, llm("ask", max_tokens=300), llm("check", model="small", max_tokens=50)],
        "edges": [["in", "ask"], ["ask", "check"]],
    }

    result = estimate(spec, InputProfile(items=1_000, tokens_per_item=1_000))

    prompt_tokens = 1_020 * (8 + 1_000)  # each call, both nodes
    ask = Decimal(prompt_tokens) * Decimal("0.5") + Decimal(1_020 * 300) * Decimal("1.5")
    check = Decimal(prompt_tokens) * Decimal("0.1") + Decimal(1_020 * 50) * Decimal("0.4")
    assert result["cost_usd"] == f"{(ask + check) / 1_000_000:.6f}"
    assert result["cost_usd"] == "1.096296"


def test_engine_seconds_follow_the_engine_speed_without_history() -> None:
    spec = {
        "nodes": [SOURCE, llm("ask", max_tokens=400), llm("quick", model="small", max_tokens=400)],
        "edges": [["in", "ask"], ["ask", "quick"]],
    }

    result = estimate(spec, InputProfile(items=100))

    # 150 ms to the first token, then 80 tokens/s; the small model decodes twice as fast.
    assert result["gpu_seconds"] == pytest.approx(102 * (0.15 + 5.0) + 102 * (0.15 + 2.5))
    assert (
        "llm 'ask': 5.15 engine seconds per call (150 ms to the first token + 400 tokens at"
        " 80 tokens/s, the simulated engine's settings; no history)"
    ) in result["assumptions"]


def test_history_overrides_max_tokens_engine_seconds_and_step_time() -> None:
    history = {"summary": NodeHistory(57, 120.0, 2_500.0, 1.75)}

    result = estimate(PAGES_SPEC, InputProfile(items=100, pages_per_item=10), history)

    assert result["tokens"]["out"] == 1_020 * 120
    assert result["gpu_seconds"] == pytest.approx(1_020 * 1.75)
    assert (
        "llm 'summary': 120 completion tokens per call (average of 57 done steps)"
        in result["assumptions"]
    )
    assert "'summary': 2,500 ms per step (average of 57 done steps)" in result["assumptions"]


def test_history_above_a_lowered_max_tokens_is_capped() -> None:
    history = {"summary": NodeHistory(5, 900.0, None, None)}

    result = estimate(PAGES_SPEC, InputProfile(items=1), history)

    assert result["tokens"]["out"] == 2 * 400
    assert (
        "llm 'summary': 400 completion tokens per call (average of 5 done steps,"
        " capped at max_tokens)"
    ) in result["assumptions"]


def test_assumptions_name_every_default_used() -> None:
    spec = {
        "nodes": [SOURCE, llm("draft"), SUMMARY],
        "edges": [["in", "draft"], ["draft", "summary"]],
    }

    notes = estimate(spec, InputProfile(items=10))["assumptions"]

    assert "llm 'summary': 400 completion tokens per call (max_tokens; no history)" in notes
    assert "llm 'draft': 256 completion tokens per call (the default max_tokens; no history)" in (
        notes
    )
    assert "5 ms per step, the default for cpu operators with no history: in" in notes
    assert (
        "an input item is 500 prompt tokens (500 a page x 1 pages; tokens_per_item not given)"
        in notes
    )
    assert (
        "model 'default': $0.5 a million prompt tokens, $1.5 a million completion tokens"
        " (this tenant's prices)"
    ) in notes
    assert "cpu: 2 steps at once (worker processes, SLUICE_CPU_CONCURRENCY)" in notes
    assert any(note.startswith("gpu.default: 32 generations at once") for note in notes)


# -- wall time ----------------------------------------------------------------------------


def test_wall_time_is_the_busiest_queue_over_its_parallelism() -> None:
    spec = {
        "nodes": [SOURCE, template("a"), template("b")],
        "edges": [["in", "a"], ["a", "b"]],
    }

    result = estimate(spec, InputProfile(items=1_000))

    assert result["wall_seconds"] == pytest.approx(3 * 1_020 * 0.005 / 2)
    assert result["gpu_seconds"] == 0
    assert result["cost_usd"] == "0.000000"
    assert result["tokens"] == {"in": 0, "out": 0}


def test_an_llm_queue_runs_as_many_generations_as_the_engine_batches() -> None:
    spec = {"nodes": [SOURCE, llm("ask", max_tokens=400)], "edges": [["in", "ask"]]}
    profile = InputProfile(items=10_000)
    wide = replace(CAPACITY, gpu_concurrency=256)

    narrow = estimate(spec, profile)["wall_seconds"]
    batched = estimate(spec, profile, capacity=wide)["wall_seconds"]

    assert narrow == pytest.approx(10_200 * 5.15 / 32)  # the GPU worker's 32 threads
    assert batched == pytest.approx(10_200 * 5.15 / 64)  # one engine's batch


def test_a_small_run_takes_at_least_one_item_along_the_slowest_path() -> None:
    result = estimate(PAGES_SPEC, InputProfile(items=1, pages_per_item=2))

    assert result["wall_seconds"] == pytest.approx(4 * 0.005 + 5.15)


# -- the profile --------------------------------------------------------------------------


def test_parse_profile_reads_every_field() -> None:
    data = {"items": 20_000, "pages_per_item": 2.5, "tokens_per_item": 900, "fanout": {"p": 3}}

    assert parse_profile(data) == InputProfile(20_000, 2.5, 900, {"p": 3.0})
    assert parse_profile({"items": 5}) == InputProfile(5)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({}, "items: is required, a whole number from 1 to 1000000"),
        ({"items": 0}, "items: must be a whole number from 1 to 1000000"),
        ({"items": 1_000_001}, "items: must be a whole number from 1 to 1000000"),
        ({"items": "10"}, "items: must be a whole number from 1 to 1000000"),
        ({"items": True}, "items: must be a whole number from 1 to 1000000"),
        ({"items": 2.5}, "items: must be a whole number from 1 to 1000000"),
        ({"items": 1, "pages_per_item": 0}, "pages_per_item: must be a number above 0"),
        ({"items": 1, "pages_per_item": "3"}, "pages_per_item: must be a number above 0"),
        ({"items": 1, "tokens_per_item": -1}, "tokens_per_item: must be a whole number"),
        ({"items": 1, "fanout": [3]}, "fanout: must be an object"),
        ({"items": 1, "fanout": {"pages": None}}, "fanout.pages: must be a number above 0"),
        ({"items": 1, "page_count": 3}, "page_count: unknown field"),
        ([1], "profile: must be a JSON object"),
    ],
)
def test_parse_profile_names_the_field_at_fault(data: object, message: str) -> None:
    with pytest.raises(ValueError, match="^" + message.replace(".", r"\.")):
        parse_profile(data)


# -- on the database ----------------------------------------------------------------------


def test_estimate_version_without_history_uses_the_tenants_prices(world: World) -> None:
    graph = world.graph("pages", PAGES_SPEC)
    # Negotiated rates are set in the admin; no service writes them.
    world.acme.model_overrides = {"default": {"usd_per_mtok_in": "2", "usd_per_mtok_out": "4"}}
    world.acme.save()
    profile = InputProfile(items=100, pages_per_item=10)

    with tenant_context(world.acme):
        result = estimate_version(graph.live_version(), profile)

    assert result["steps"]["total"] == math.ceil(100 * 1.02) * 3 + 1_020 * 2
    tokens = result["tokens"]
    assert tokens == {"in": 1_020 * 508, "out": 1_020 * 400}
    assert result["cost_usd"] == f"{(tokens['in'] * 2 + tokens['out'] * 4) / 1_000_000:.6f}"
    assert (
        "llm 'summary': 400 completion tokens per call (max_tokens; no history)"
        in (result["assumptions"])
    )


def test_actual_for_a_queued_run_is_its_source_step(world: World) -> None:
    graph = world.graph("pages", PAGES_SPEC)
    with tenant_context(world.acme):
        run = start_run(version=graph.live_version(), payload={"pages": []}, actor=world.owner)

        actual = actual_for_run(run)

    assert actual["steps"] == {
        "total": 1,
        "per_node": {"in": 1, "pages": 0, "clean": 0, "summary": 0, "gather": 0},
    }
    assert actual["attempts"]["total"] == 0
    assert actual["tokens"] == {"in": 0, "out": 0}
    assert actual["gpu_seconds"] == 0
    assert actual["cost_usd"] == "0.000000"
    assert actual["wall_seconds"] >= 0
    assert actual["finished"] is False
    assert json.loads(json.dumps(actual)) == actual


@pytest.mark.workers
@pytest.mark.django_db(transaction=True)
def test_a_finished_run_is_the_history_of_the_next_estimate(world: World, platform: object) -> None:
    ask = llm("ask", prompt="Tell me about {{ topic }}", max_tokens=12)
    spec = {"nodes": [SOURCE, ask], "edges": [["in", "ask"]]}
    graph = world.graph("ask", spec)
    with tenant_context(world.acme):
        run = start_run(version=graph.live_version(), payload={"topic": "x"}, actor=world.owner)
    run = wait_for_run(run)

    with tenant_context(world.acme):
        actual = actual_for_run(run)
        step = Step.objects.get(run=run, node_id="ask")
        result = estimate_version(graph.live_version(), InputProfile(items=50))

    assert run.status == RunStatus.SUCCEEDED, run.error
    assert actual["finished"] is True
    assert actual["steps"]["per_node"] == {"in": 1, "ask": 1}
    assert actual["tokens"] == {"in": step.tokens_in, "out": step.tokens_out}
    assert actual["cost_usd"] == f"{step.cost_usd:.6f}"
    assert actual["gpu_seconds"] > 0
    assert actual["wall_seconds"] > 0
    # The estimate for 50 more now leans on that one step, not on max_tokens.
    assert result["tokens"]["out"] == 51 * step.tokens_out
    assert (
        f"llm 'ask': {step.tokens_out} completion tokens per call (average of 1 done steps)"
        in result["assumptions"]
    )
    source_time = [note for note in result["assumptions"] if note.startswith("'in': ")]
    assert source_time and source_time[0].endswith("ms per step (average of 1 done steps)")


@pytest.mark.workers
@pytest.mark.django_db(transaction=True)
def test_history_spans_versions_but_not_a_node_whose_type_changed(
    world: World, platform: object
) -> None:
    ask = llm("ask", prompt="Tell me about {{ topic }}", max_tokens=12)
    graph = world.graph("ask", {"nodes": [SOURCE, ask], "edges": [["in", "ask"]]})
    with tenant_context(world.acme):
        run = start_run(version=graph.live_version(), payload={"topic": "x"}, actor=world.owner)
    assert wait_for_run(run).status == RunStatus.SUCCEEDED
    changed = {"nodes": [SOURCE, template("ask")], "edges": [["in", "ask"]]}
    with tenant_context(world.acme):
        version = add_version(graph=graph, spec=changed, actor=world.owner, deploy=False)
        notes = estimate_version(version, InputProfile(items=5))["assumptions"]

    assert any(note.startswith("'in': ") and "(average of 1 done steps)" in note for note in notes)
    assert "5 ms per step, the default for cpu operators with no history: ask" in notes
