"""The operator registry. Importing this package registers every built-in operator."""

from workers.operators import (  # noqa: F401  (registration by import)
    builtin,
    http,
    llm,
    streams,
    windows,
)
from workers.operators.base import REGISTRY, Operator

__all__ = ["REGISTRY", "Operator"]
