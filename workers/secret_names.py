"""What a secret's name may be. Kept free of models so operator schemas can import it."""

import re

# Lowercase, so "API-key" and "api-key" can never be two different secrets.
NAME_PATTERN = r"^[a-z][a-z0-9_-]{0,63}$"
NAME_RULE = "lowercase letters, digits, '-' and '_', starting with a letter, at most 64 characters"
NAME_SCHEMA = {"type": "string", "pattern": NAME_PATTERN, "x-rule": f"must be {NAME_RULE}"}

_NAME = re.compile(NAME_PATTERN)


def name_problem(name: str) -> str | None:
    """Why `name` is not a valid secret name, or None."""
    if not name:
        return "A name is required."
    if not _NAME.fullmatch(name):
        return f"Use {NAME_RULE}."
    return None
