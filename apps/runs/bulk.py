"""Writing many new rows of one model with COPY instead of a multi-row INSERT.

A bulk intake of 500 events writes 1,000 rows; as an INSERT that is one statement with
some 16,000 parameters, which Django and psycopg spend more time building and binding than
PostgreSQL spends storing it (bench/ingest). COPY streams the same rows. Only for plain
new rows: every column is written as Django would on save (defaults and auto_now_add
filled in by the fields themselves), no signals, no returned ids (set them before)."""

from collections.abc import Sequence

from django.db import connection
from django.db.models import Model


def copy_new_rows(objects: Sequence[Model]) -> None:
    if not objects:
        return
    fields = type(objects[0])._meta.concrete_fields
    table = connection.ops.quote_name(type(objects[0])._meta.db_table)
    # A concrete field always has a column.
    columns = ", ".join(connection.ops.quote_name(str(f.column)) for f in fields)
    with connection.cursor() as cursor, cursor.copy(f"COPY {table} ({columns}) FROM STDIN") as copy:
        for obj in objects:
            copy.write_row(
                [f.get_db_prep_save(f.pre_save(obj, add=True), connection) for f in fields]
            )
