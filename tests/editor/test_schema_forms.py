"""Config forms from operator schemas: the widgets chosen, and typed values parsed back with a
message per field."""

from apps.editor.schema_forms import fields_for, parse_fields
from workers.operators import REGISTRY

GENERATE = REGISTRY["llm.generate"].config_schema


def test_widgets_follow_the_schema() -> None:
    fields = {f.name: f for f in fields_for(GENERATE, {"prompt": "Hi", "max_tokens": 12})}
    assert fields["prompt"].widget == "textarea" and fields["prompt"].required
    assert fields["prompt"].value == "Hi"
    assert fields["max_tokens"].widget == "number"
    assert (fields["max_tokens"].step, fields["max_tokens"].minimum) == ("1", "1")
    assert fields["max_tokens"].value == "12"
    assert fields["temperature"].step == "any"
    assert fields["model"].widget == "text" and fields["model"].help == "Default: default."
    collect = {f.name: f for f in fields_for(REGISTRY["collect"].config_schema, {})}
    assert collect["on_item_failure"].widget == "select"
    assert collect["on_item_failure"].choices == ["fail_run", "collect_succeeded"]
    source = {f.name: f for f in fields_for(REGISTRY["source.manual"].config_schema, {})}
    assert source["input_schema"].widget == "json"


def test_choices_from_outside_the_schema_make_a_select_that_keeps_the_current_value() -> None:
    def choices(name: str) -> list[str] | None:
        return ["default", "small"] if name == "model" else None

    [model] = [f for f in fields_for(GENERATE, {"model": "gone"}, choices) if f.name == "model"]
    assert model.widget == "select"
    assert model.choices == ["default", "small", "gone"]


def test_parsing_types_values_and_leaves_empty_optional_fields_out() -> None:
    values, errors = parse_fields(
        GENERATE,
        {"cfg.prompt": "Hi {{ q }}", "cfg.max_tokens": "40", "cfg.temperature": "0.5"},
        "cfg.",
    )
    assert errors == {}
    assert values == {"prompt": "Hi {{ q }}", "max_tokens": 40, "temperature": 0.5}


def test_parsing_names_each_bad_field() -> None:
    _, errors = parse_fields(GENERATE, {"cfg.max_tokens": "4.5", "cfg.temperature": "hot"}, "cfg.")
    assert errors == {
        "prompt": "This field is required.",
        "max_tokens": "Enter a whole number, not '4.5'.",
        "temperature": "Enter a number, not 'hot'.",
    }
    source = REGISTRY["source.manual"].config_schema
    _, errors = parse_fields(source, {"example": "{not json"})
    assert errors["example"].startswith("Not valid JSON: Expecting property name")


def test_enum_members_keep_their_json_type() -> None:
    schema = {"type": "object", "properties": {"n": {"enum": [1, 2, "three"]}}}
    assert parse_fields(schema, {"n": "2"}) == ({"n": 2}, {})
    assert parse_fields(schema, {"n": "three"}) == ({"n": "three"}, {})


def test_a_pattern_error_says_the_rule_in_words() -> None:
    from apps.graphs.validation import validate_spec

    spec = {
        "nodes": [
            {"id": "in", "type": "source.manual"},
            {"id": "keep", "type": "sink.table", "config": {"table": "Bad Name"}},
        ],
        "edges": [["in", "keep"]],
    }
    [error] = validate_spec(spec)
    assert error.field == "config.table"
    assert error.message == (
        "'Bad Name' must be lowercase letters, digits and '_', starting with a letter"
    )
