"""Graph spec validation: a valid pipeline passes, and each kind of mistake is reported with
the exact words a user will see. Pure functions: no database."""

import copy
import json
from collections.abc import Callable
from typing import Any

import pytest

from apps.graphs.validation import (
    MAX_NODES,
    MAX_SPEC_BYTES,
    SpecError,
    SpecInvalid,
    check_spec,
    downstream,
    node_backoff_s,
    node_max_attempts,
    node_queue,
    source_node,
    spec_max_fanout,
    validate_spec,
)
from workers.operators import REGISTRY

JSON = dict[str, Any]
KNOWN_TYPES = ", ".join(sorted(REGISTRY))


def valid_spec() -> JSON:
    return {
        "nodes": [
            {
                "id": "docs",
                "type": "source.manual",
                "label": "Documents",
                "position": {"x": 0, "y": 0},
            },
            {"id": "split", "type": "fanout.split", "config": {"field": "items", "max_items": 100}},
            {
                "id": "text",
                "type": "transform.template",
                "config": {"template": "Item: {{ item }}", "output": "text"},
                "retry": {"max_attempts": 5, "backoff_s": 2.5},
            },
            {"id": "gather", "type": "collect", "config": {"by": "split"}},
            {
                "id": "summary",
                "type": "llm.generate",
                "config": {
                    "model": "default",
                    "prompt": "Summarize: {{ items }}",
                    "max_tokens": 50,
                },
            },
            {
                "id": "store",
                "type": "sink.table",
                "config": {"table": "summaries"},
                "resources": {"queue": "cpu"},
            },
        ],
        "edges": [
            ["docs", "split"],
            ["split", "text"],
            ["text", "gather"],
            ["gather", "summary"],
            ["summary", "store"],
        ],
        "policies": {"ttl_s": 900, "budget_usd": 20, "max_fanout": 5000, "on_disconnect": "detach"},
    }


def switch_spec() -> JSON:
    return {
        "nodes": [
            {"id": "docs", "type": "source.manual"},
            {
                "id": "route",
                "type": "route.switch",
                "config": {"field": "priority", "cases": {"high": "urgent", "low": "normal"}},
            },
            {"id": "page", "type": "sink.table", "config": {"table": "pages"}},
            {"id": "queue", "type": "sink.table", "config": {"table": "queued"}},
            {"id": "audit", "type": "sink.table", "config": {"table": "audit"}},
        ],
        "edges": [
            ["docs", "route"],
            ["route", "page", "urgent"],
            ["route", "queue", "normal"],
            ["route", "audit", "urgent"],
        ],
    }


def node(spec: JSON, node_id: str) -> JSON:
    return next(n for n in spec["nodes"] if n["id"] == node_id)


def messages(spec: object) -> list[str]:
    return [str(error) for error in validate_spec(spec)]


# -- valid specs --------------------------------------------------------------------------


def test_valid_spec_has_no_errors() -> None:
    assert validate_spec(valid_spec()) == []


def test_switch_spec_has_no_errors() -> None:
    assert validate_spec(switch_spec()) == []


def test_minimal_spec_is_one_source() -> None:
    assert validate_spec({"nodes": [{"id": "in", "type": "source.manual"}]}) == []


def test_check_spec_returns_the_spec() -> None:
    spec = valid_spec()
    assert check_spec(spec) is spec


def test_check_spec_raises_with_every_error() -> None:
    spec = valid_spec()
    node(spec, "text")["config"] = {}
    node(spec, "store")["retry"] = {"max_attempts": 11}
    with pytest.raises(SpecInvalid) as raised:
        check_spec(spec)
    assert raised.value.errors == [
        SpecError("node 'store'", "retry.max_attempts", "11 is greater than the maximum of 10"),
        SpecError("node 'text'", "config", "'template' is a required property"),
    ]
    assert str(raised.value) == (
        "node 'store': retry.max_attempts: 11 is greater than the maximum of 10; "
        "node 'text': config: 'template' is a required property"
    )


def test_spec_error_str_omits_an_empty_field() -> None:
    assert str(SpecError("edge 2", "", "duplicate edge")) == "edge 2: duplicate edge"
    assert str(SpecError("node 'a'", "type", "bad")) == "node 'a': type: bad"


# -- invalid specs: the exact messages ----------------------------------------------------

Mutation = Callable[[JSON], None]


def add_edge(*edge: str) -> Mutation:
    return lambda spec: spec["edges"].append(list(edge))


def add_node(new: JSON, *edges: list[str]) -> Mutation:
    def mutate(spec: JSON) -> None:
        spec["nodes"].append(new)
        spec["edges"].extend(edges)

    return mutate


def set_in(node_id: str, key: str, value: Any) -> Mutation:
    return lambda spec: node(spec, node_id).__setitem__(key, value)


def set_config(node_id: str, key: str, value: Any) -> Mutation:
    return lambda spec: node(spec, node_id)["config"].__setitem__(key, value)


def all_of(*mutations: Mutation) -> Mutation:
    def mutate(spec: JSON) -> None:
        for mutation in mutations:
            mutation(spec)

    return mutate


def chain_of(count: int) -> JSON:
    nodes: list[JSON] = [{"id": "n0", "type": "source.manual"}]
    nodes += [
        {"id": f"n{i}", "type": "transform.template", "config": {"template": "x"}}
        for i in range(1, count)
    ]
    return {"nodes": nodes, "edges": [[f"n{i}", f"n{i + 1}"] for i in range(count - 1)]}


NOT_UPSTREAM_SPLIT = {"id": "other_split", "type": "fanout.split", "config": {"field": "pages"}}

CASES: list[tuple[str, Mutation, list[str]]] = [
    (
        "cycle",
        add_edge("store", "text"),
        ["spec: edges: graph has a cycle: text -> gather -> summary -> store -> text"],
    ),
    (
        "self-loop",
        add_edge("summary", "summary"),
        ["spec: edges: graph has a cycle: summary -> summary"],
    ),
    (
        "unknown type",
        set_in("summary", "type", "llm.generat"),
        [f"node 'summary': type: unknown operator type 'llm.generat' (known: {KNOWN_TYPES})"],
    ),
    (
        "missing required template",
        set_in("text", "config", {"output": "text"}),
        ["node 'text': config: 'template' is a required property"],
    ),
    (
        "template syntax error",
        set_config("text", "template", "{{ x "),
        [
            (
                "node 'text': config.template: "
                "line 1: unexpected end of template, expected 'end of print statement'."
            )
        ],
    ),
    (
        "extra config key",
        set_config("text", "temperature", 0.5),
        [
            (
                "node 'text': config: "
                "Additional properties are not allowed ('temperature' was unexpected)"
            )
        ],
    ),
    (
        "config value of the wrong type",
        set_config("split", "max_items", "100"),
        ["node 'split': config.max_items: '100' is not of type 'integer'"],
    ),
    (
        "unknown model",
        set_config("summary", "model", "gpt-9"),
        ["node 'summary': config.model: unknown model 'gpt-9' (known: default, small)"],
    ),
    (
        "a quality floor above the model's own tier",
        set_config("summary", "min_quality", 3),
        [
            "node 'summary': config.min_quality: model default is quality 2, below"
            " min_quality 3; choose a better model or lower the floor"
        ],
    ),
    (
        "an unknown priority",
        set_config("summary", "priority", "urgent"),
        ["node 'summary': config.priority: 'urgent' is not one of ['low', 'normal', 'high']"],
    ),
    (
        "dangling edge",
        add_edge("store", "nowhere"),
        ["edge 5: node 'nowhere' does not exist"],
    ),
    (
        "edge between two missing nodes",
        add_edge("ghost", "phantom"),
        ["edge 5: node 'ghost' does not exist", "edge 5: node 'phantom' does not exist"],
    ),
    (
        "duplicate edge",
        add_edge("docs", "split"),
        ["edge 5: duplicate edge"],
    ),
    (
        "duplicate edge spelling out the default port",
        add_edge("docs", "split", "out"),
        ["edge 5: duplicate edge"],
    ),
    (
        "bad port",
        lambda spec: spec["edges"][0].append("items"),
        ["edge 0: node 'docs' has no port 'items' (its ports: out)"],
    ),
    (
        "edge into the source",
        add_edge("store", "docs"),
        ["node 'docs': a source cannot have incoming edges"],
    ),
    (
        "collect by a node that is not a fan-out",
        set_config("gather", "by", "text"),
        ["node 'gather': config.by: 'text' is not a fanout.split node"],
    ),
    (
        "collect by a fan-out that is not upstream",
        all_of(
            add_node(NOT_UPSTREAM_SPLIT, ["docs", "other_split"]),
            set_config("gather", "by", "other_split"),
        ),
        ["node 'gather': config.by: 'other_split' is not upstream of this node"],
    ),
    (
        "two collects for one fan-out",
        add_node(
            {"id": "gather2", "type": "collect", "config": {"by": "split"}}, ["text", "gather2"]
        ),
        ["node 'gather2': config.by: fan-out 'split' is already collected by 'gather'"],
    ),
    (
        "duplicate ids",
        add_node(
            {"id": "text", "type": "transform.template", "config": {"template": "again"}},
        ),
        ["node 'text': id: is used by more than one node"],
    ),
    (
        "no source",
        lambda spec: node(spec, "docs").update(
            type="transform.template", config={"template": "{{ input }}"}
        ),
        [
            "spec: nodes: the graph needs exactly one source node, found 0",
            "node 'docs': has no incoming edge; only the source node may start the graph",
        ],
    ),
    (
        "two sources",
        add_node({"id": "more", "type": "source.manual"}),
        ["spec: nodes: the graph needs exactly one source node, found 2"],
    ),
    (
        "node without an incoming edge",
        add_node({"id": "orphan", "type": "sink.table", "config": {"table": "orphans"}}),
        ["node 'orphan': has no incoming edge; only the source node may start the graph"],
    ),
    (
        "retry.max_attempts of 0",
        set_in("text", "retry", {"max_attempts": 0}),
        ["node 'text': retry.max_attempts: 0 is less than the minimum of 1"],
    ),
    (
        "unknown retry key",
        set_in("text", "retry", {"max_attempts": 2, "jitter": True}),
        ["node 'text': retry: Additional properties are not allowed ('jitter' was unexpected)"],
    ),
    (
        "unknown queue",
        set_in("text", "resources", {"queue": "tpu"}),
        ["node 'text': resources.queue: 'tpu' is not one of ['cpu', 'gpu']"],
    ),
    (
        "queue on an llm node",
        set_in("summary", "resources", {"queue": "cpu"}),
        [
            "node 'summary': resources.queue: llm.generate runs on its model's pool"
            " (gpu.default); remove resources.queue"
        ],
    ),
    (
        "label too long",
        set_in("docs", "label", "x" * 101),
        [f"node 'docs': label: '{'x' * 101}' is too long"],
    ),
    (
        "unknown node key",
        set_in("docs", "colour", "red"),
        ["node 'docs': Additional properties are not allowed ('colour' was unexpected)"],
    ),
    (
        "unknown policy key",
        lambda spec: spec["policies"].__setitem__("priority", 1),
        ["policies: Additional properties are not allowed ('priority' was unexpected)"],
    ),
    (
        "policy out of range",
        lambda spec: spec["policies"].__setitem__("ttl_s", 0),
        ["policies: ttl_s: 0 is less than the minimum of 1"],
    ),
    (
        "unknown on_disconnect",
        lambda spec: spec["policies"].__setitem__("on_disconnect", "ignore"),
        ["policies: on_disconnect: 'ignore' is not one of ['cancel', 'detach']"],
    ),
    (
        "unknown top-level key",
        lambda spec: spec.__setitem__("owner", "me"),
        ["spec: Additional properties are not allowed ('owner' was unexpected)"],
    ),
    (
        "edge that is too short",
        lambda spec: spec["edges"].append(["docs"]),
        ["edge 5: must be [from, to] or [from, to, port]"],
    ),
    (
        "edge with a non-string endpoint",
        lambda spec: spec["edges"].append(["store", 7]),
        ["edge 5: to: 7 is not of type 'string'"],
    ),
    (
        "several independent mistakes at once",
        all_of(
            set_in("store", "retry", {"backoff_s": -1}),
            set_in("summary", "type", "llm.chat"),
            set_config("text", "template", "{% if %}"),
        ),
        [
            "node 'store': retry.backoff_s: -1 is less than the minimum of 0",
            f"node 'summary': type: unknown operator type 'llm.chat' (known: {KNOWN_TYPES})",
            (
                "node 'text': config.template: "
                "line 1: Expected an expression, got 'end of statement block'"
            ),
        ],
    ),
]


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [pytest.param(mutate, expected, id=name) for name, mutate, expected in CASES],
)
def test_invalid_spec_messages(mutate: Mutation, expected: list[str]) -> None:
    spec = copy.deepcopy(valid_spec())
    mutate(spec)
    assert messages(spec) == expected


def test_switch_ports() -> None:
    spec = switch_spec()
    spec["edges"].append(["route", "audit", "low"])
    spec["edges"].append(["route", "queue"])
    assert messages(spec) == [
        "edge 4: node 'route' has no port 'low' (its ports: normal, urgent)",
        "edge 5: node 'route' has no port 'out' (its ports: normal, urgent)",
    ]


def test_switch_default_is_a_port() -> None:
    spec = switch_spec()
    node(spec, "route")["config"]["default"] = "other"
    spec["edges"].append(["route", "audit", "other"])
    assert validate_spec(spec) == []


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ([], "spec: spec must be a JSON object, got array"),
        ("nodes", "spec: spec must be a JSON object, got string"),
        (None, "spec: spec must be a JSON object, got null"),
        (3.5, "spec: spec must be a JSON object, got number"),
    ],
)
def test_spec_that_is_not_an_object(spec: object, expected: str) -> None:
    assert messages(spec) == [expected]


def test_oversize_spec() -> None:
    spec = valid_spec()
    node(spec, "docs")["config"] = {"input_schema": {"description": "x" * MAX_SPEC_BYTES}}
    size = len(json.dumps(spec).encode())
    assert size > MAX_SPEC_BYTES
    assert messages(spec) == [f"spec: spec is {size} bytes; the limit is 262144 bytes"]


def test_too_many_nodes() -> None:
    assert validate_spec(chain_of(MAX_NODES)) == []
    assert messages(chain_of(MAX_NODES + 1)) == ["spec: nodes: 501 nodes; the limit is 500"]


def test_missing_and_empty_nodes() -> None:
    assert messages({}) == ["spec: 'nodes' is a required property"]
    assert messages({"nodes": []}) == ["spec: nodes: the graph needs at least one node"]
    assert messages({"nodes": {}}) == ["spec: nodes: {} is not of type 'array'"]


def test_malformed_node_stops_before_graph_checks() -> None:
    spec = valid_spec()
    spec["nodes"].append("store")
    spec["nodes"].append({"type": "sink.table"})
    assert messages(spec) == [
        "nodes[6]: 'store' is not of type 'object'",
        "nodes[7]: 'id' is a required property",
    ]


@pytest.mark.parametrize("bad_id", ["Docs", "1docs", "docs\n", "d" * 65, "has space"])
def test_bad_node_id(bad_id: str) -> None:
    spec = {"nodes": [{"id": bad_id, "type": "source.manual"}]}
    assert messages(spec) == [
        (
            f"node '{bad_id}': id: must start with a lowercase letter followed by up to 63 "
            "lowercase letters, digits, '_' or '-'"
        )
    ]


def test_non_json_values_are_reported_not_raised() -> None:
    spec = valid_spec()
    spec["policies"]["budget_usd"] = float("nan")
    errors = messages(spec)
    assert len(errors) == 1
    assert errors[0].startswith("spec: spec is not valid JSON: Out of range float values")


def test_deeply_nested_template_is_reported_not_raised() -> None:
    spec = valid_spec()
    node(spec, "text")["config"]["template"] = "{{ " + "(" * 3000 + "x" + ")" * 3000 + " }}"
    errors = validate_spec(spec)
    assert len(errors) == 1
    assert errors[0].where == "node 'text'"
    assert errors[0].field.startswith("config")


# -- readers for a valid spec -------------------------------------------------------------


def test_node_queue() -> None:
    assert node_queue({"id": "s", "type": "llm.generate"}) == "gpu.default"
    assert node_queue({"id": "t", "type": "transform.template"}) == "cpu"
    small = {"id": "s", "type": "llm.generate", "config": {"model": "small", "prompt": "x"}}
    assert node_queue(small) == "gpu.small"  # each model has its own pool
    assert (
        node_queue({"id": "t", "type": "transform.template", "resources": {"queue": "gpu"}})
        == "gpu"
    )
    assert node_queue({"id": "t", "type": "transform.template", "resources": {}}) == "cpu"


def test_retry_settings() -> None:
    spec = valid_spec()
    assert node_max_attempts(node(spec, "text")) == 5
    assert node_backoff_s(node(spec, "text")) == 2.5
    assert node_max_attempts(node(spec, "store")) == 3
    assert node_backoff_s(node(spec, "store")) == 1.0
    assert node_max_attempts({"id": "x", "type": "collect", "retry": {"backoff_s": 0}}) == 3


def test_spec_max_fanout() -> None:
    spec = valid_spec()
    assert spec_max_fanout(spec, 10) == 5000
    del spec["policies"]["max_fanout"]
    assert spec_max_fanout(spec, 10) == 10
    del spec["policies"]
    assert spec_max_fanout(spec, 10) == 10


def test_source_node() -> None:
    assert source_node(valid_spec())["id"] == "docs"


def test_downstream_follows_ports() -> None:
    spec = switch_spec()
    assert downstream(spec, "route", "urgent") == ["page", "audit"]
    assert downstream(spec, "route", "normal") == ["queue"]
    assert downstream(spec, "route", "out") == []
    assert downstream(spec, "docs", "out") == ["route"]
    assert downstream(spec, "page", "out") == []
    assert downstream(valid_spec(), "split", "out") == ["text"]
