"""The version diff names what changed in behaviour, key by key, and keeps moves apart."""

from typing import Any

from apps.graphs.diff import MISSING, diff_specs

OLD: dict[str, Any] = {
    "nodes": [
        {"id": "in", "type": "source.manual", "position": {"x": 0, "y": 0}},
        {
            "id": "ask",
            "type": "llm.generate",
            "config": {"prompt": "Hi {{ q }}", "max_tokens": 5},
            "position": {"x": 200, "y": 0},
        },
        {"id": "keep", "type": "sink.table", "config": {"table": "a"}},
    ],
    "edges": [["in", "ask"], ["ask", "keep"]],
    "policies": {"ttl_s": 60},
}


def new_spec() -> dict[str, Any]:
    return {
        "nodes": [
            {"id": "in", "type": "source.manual", "position": {"x": 0, "y": 90}},
            {
                "id": "ask",
                "type": "llm.generate",
                "config": {"prompt": "Hello {{ q }}", "temperature": 0.5},
                "position": {"x": 200, "y": 0},
            },
            {"id": "shout", "type": "transform.template", "config": {"template": "x"}},
        ],
        "edges": [["in", "ask"], ["ask", "shout"]],
        "policies": {"ttl_s": 120, "on_disconnect": "cancel"},
    }


def test_nodes_edges_config_and_policies_are_compared() -> None:
    diff = diff_specs(OLD, new_spec())
    assert [n["id"] for n in diff.added_nodes] == ["shout"]
    assert [n["id"] for n in diff.removed_nodes] == ["keep"]
    [ask] = diff.changed_nodes
    assert ask.id == "ask"
    changes = {c.field: (c.kind, c.before, c.after) for c in ask.changes}
    assert changes == {
        "config.max_tokens": ("removed", 5, MISSING),
        "config.prompt": ("changed", "Hi {{ q }}", "Hello {{ q }}"),
        "config.temperature": ("added", MISSING, 0.5),
    }
    assert [str(e) for e in diff.added_edges] == ["ask → shout"]
    assert [str(e) for e in diff.removed_edges] == ["ask → keep"]
    policies = {c.field: c.kind for c in diff.policy_changes}
    assert policies == {"on_disconnect": "added", "ttl_s": "changed"}
    assert diff.moved_nodes == ["in"]
    assert diff.behaviour_changed
    assert diff.summary() == (
        "1 node added, 1 node removed, 1 node changed, 1 edge added, 1 edge removed,"
        " 2 policies changed, 1 node moved"
    )


def test_a_move_alone_is_not_a_change_of_behaviour_and_equal_specs_have_no_diff() -> None:
    moved = {**OLD, "nodes": [{**OLD["nodes"][0], "position": {"x": 5, "y": 5}}, *OLD["nodes"][1:]]}
    diff = diff_specs(OLD, moved)
    assert not diff.behaviour_changed
    assert diff.moved_nodes == ["in"]
    assert diff_specs(OLD, OLD).summary() == "no changes"


def test_a_port_counts_as_part_of_the_edge_and_the_default_port_is_implicit() -> None:
    old = {"nodes": [], "edges": [["a", "b"], ["a", "c", "urgent"]]}
    new = {"nodes": [], "edges": [["a", "b", "out"], ["a", "c", "other"]]}
    diff = diff_specs(old, new)
    assert [str(e) for e in diff.added_edges] == ["a → c [other]"]
    assert [str(e) for e in diff.removed_edges] == ["a → c [urgent]"]


def test_a_changed_type_and_nested_values_are_reported_as_fields() -> None:
    old = {
        "nodes": [
            {"id": "n", "type": "collect", "config": {"by": "s"}, "retry": {"max_attempts": 2}}
        ]
    }
    new = {"nodes": [{"id": "n", "type": "fanout.split", "config": {"field": "xs"}}]}
    [node] = diff_specs(old, new).changed_nodes
    fields = {c.field: c.kind for c in node.changes}
    assert fields == {
        "config.by": "removed",
        "config.field": "added",
        "retry.max_attempts": "removed",
        "type": "changed",
    }


def test_values_are_compared_as_json_not_as_python() -> None:
    old = {"nodes": [{"id": "n", "type": "t", "config": {"a": 1, "b": 1}}]}
    new = {"nodes": [{"id": "n", "type": "t", "config": {"a": True, "b": 1}}]}
    [node] = diff_specs(old, new).changed_nodes
    assert [(c.field, c.before, c.after) for c in node.changes] == [("config.a", 1, True)]
