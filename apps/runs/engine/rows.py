"""Model rows to and from hand-written SQL, for the store's one-statement paths.

New rows travel as one JSON parameter read by `jsonb_populate_recordset`, so a commit that
writes five events and four steps is still one statement; rows come back through
RETURNING and are turned into model instances as the ORM would (`from_db` and each field's
`from_db_value`), so the engine keeps working with Step and Run objects."""

import json
from datetime import date, datetime
from decimal import Decimal
from typing import Any, TypeVar
from uuid import UUID

from django.db import connection
from django.db.models import Field, Model

M = TypeVar("M", bound=Model)


def columns(model: type[Model], *, leave_out: tuple[str, ...] = ()) -> list["Field[Any, Any]"]:
    return [f for f in model._meta.concrete_fields if f.attname not in leave_out]


def column_list(fields: list["Field[Any, Any]"], alias: str) -> str:
    return ", ".join(f"{alias}.{connection.ops.quote_name(str(f.column))}" for f in fields)


def _plain(value: Any) -> Any:
    """What json.dumps cannot write itself, as PostgreSQL's input functions read it."""
    if isinstance(value, datetime | date):
        return value.isoformat()  # full precision, with the offset
    if isinstance(value, UUID | Decimal):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to a row")


def rows_json(objects: list[M], *, leave_out: tuple[str, ...] = ()) -> str:
    """New rows as a JSON array of objects keyed by column, every column present (a missing
    key would be written NULL) but those left out, each value as saving the object would
    give it (defaults and auto_now_add filled in by the fields themselves)."""
    if not objects:
        return "[]"
    fields = columns(type(objects[0]), leave_out=leave_out)
    rows = [{str(f.column): f.pre_save(obj, add=True) for f in fields} for obj in objects]
    return json.dumps(rows, default=_plain)


def from_row(model: type[M], fields: list["Field[Any, Any]"], values: tuple[Any, ...]) -> M:
    """A model instance from a raw row of `fields`; fields not listed are left deferred."""
    converted = []
    for field, value in zip(fields, values, strict=True):
        from_db = getattr(field, "from_db_value", None)
        converted.append(value if from_db is None else from_db(value, None, connection))
    return model.from_db("default", [f.attname for f in fields], converted)


def from_json(model: type[M], fields: list["Field[Any, Any]"], rows: str | None) -> list[M]:
    """Model instances from a `jsonb_agg` of whole rows (NULL when there were none)."""
    if rows is None:
        return []
    return [
        model.from_db(
            "default",
            [f.attname for f in fields],
            [f.to_python(obj[str(f.column)]) for f in fields],
        )
        for obj in json.loads(rows)
    ]
