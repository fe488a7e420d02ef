"""The audit diff: which keys were added, removed, changed or kept, as compact JSON."""

from apps.audit.diff import WHOLE_VALUE, Change, KeyDiff, compact, diff, summary


def test_every_key_of_either_side_is_classified_in_sorted_order() -> None:
    before = {"budget": "10", "name": "Acme", "tags": ["a"], "same": {"x": 1, "y": 2}}
    after = {"same": {"y": 2, "x": 1}, "budget": "20", "tags": ["a"], "new": None}
    assert diff(before, after) == [
        KeyDiff("budget", Change.CHANGED, '"10"', '"20"'),
        KeyDiff("name", Change.REMOVED, '"Acme"', ""),
        KeyDiff("new", Change.ADDED, "", "null"),
        KeyDiff("same", Change.UNCHANGED, '{"x":1,"y":2}', '{"x":1,"y":2}'),
        KeyDiff("tags", Change.UNCHANGED, '["a"]', '["a"]'),
    ]


def test_json_types_are_compared_as_json() -> None:
    rows = diff({"on": 1, "n": 2}, {"on": True, "n": 2})
    assert [(row.key, row.change) for row in rows] == [
        ("n", Change.UNCHANGED),
        ("on", Change.CHANGED),
    ]


def test_missing_sides_and_non_objects() -> None:
    assert diff(None, None) == []
    assert [row.change for row in diff(None, {"a": 1})] == [Change.ADDED]
    assert [row.change for row in diff({"a": 1}, None)] == [Change.REMOVED]
    assert diff("old", "new") == [KeyDiff(WHOLE_VALUE, Change.CHANGED, '"old"', '"new"')]
    assert compact({"b": "é", "a": [1, 2]}) == '{"a":[1,2],"b":"é"}'


def test_summary_lists_only_what_differs_and_is_cut_to_its_limit() -> None:
    before = {"budget": "10", "name": "Acme", "same": 1}
    after = {"budget": "20", "same": 1, "new": 2}
    assert summary(before, after) == "~budget -name +new"  # sorted: budget, name, new
    assert summary({"a": 1}, {"a": 1}) == ""
    long = summary(None, {f"key{i}": i for i in range(40)}, limit=30)
    assert len(long) == 30 and long.endswith("…") and long.startswith("+key0 +key1 +key10")
