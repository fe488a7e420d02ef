"""The operator registry. Importing this package registers every built-in operator."""

from workers.operators import builtin, http, llm, streams  # noqa: F401  (registration by import)
from workers.operators.base import REGISTRY, Operator

__all__ = ["REGISTRY", "Operator"]
