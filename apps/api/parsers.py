"""The API's body parsers. JSON as DRF reads it, except that a body nested past Python's
parser refuses as bad JSON (DRF catches only ValueError: a RecursionError was a 500). JSON
lines (`application/x-ndjson`): one JSON value per line, blank lines ignored; a line that is
not JSON refuses the whole body and names its line number."""

import json
from typing import Any

from rest_framework import parsers
from rest_framework.exceptions import ParseError
from rest_framework.parsers import BaseParser

JSON_LINES = "application/x-ndjson"


def parse_lines(raw: bytes) -> list[Any]:
    items = []
    for number, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            items.append(json.loads(line))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
            raise ParseError(f"line {number} is not valid JSON: {error}") from None
    return items


class JsonLinesParser(BaseParser):
    media_type = JSON_LINES

    def parse(self, stream: Any, media_type: str | None = None, parser_context: Any = None) -> Any:
        return parse_lines(stream.read())


class JSONParser(parsers.JSONParser):
    def parse(self, stream: Any, media_type: str | None = None, parser_context: Any = None) -> Any:
        try:
            return super().parse(stream, media_type, parser_context)
        except RecursionError:
            raise ParseError("JSON parse error - the body is nested too deeply") from None
