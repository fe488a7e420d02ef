"""The model registry: which engine serves a model name, and at what price.

Until a GPU engine or a provider is configured every model is served by the simulated
engine, and the UI says so.
"""

from dataclasses import dataclass

from django.conf import settings

from workers.engines.simulated import SimulatedEngine


@dataclass(frozen=True)
class ModelEntry:
    name: str
    engine: str
    usd_per_1k_input: float
    usd_per_1k_output: float

    def cost(self, tokens_in: int, tokens_out: int) -> float:
        return (tokens_in * self.usd_per_1k_input + tokens_out * self.usd_per_1k_output) / 1000


MODELS: dict[str, ModelEntry] = {
    "default": ModelEntry("default", "simulated", 0.0, 0.0),
}


def simulated_engine() -> SimulatedEngine:
    return SimulatedEngine(
        ttft_s=settings.SLUICE_SIM_TTFT_MS / 1000,
        tokens_per_s=settings.SLUICE_SIM_TOKENS_PER_S,
        fail_first_attempts=settings.SLUICE_SIM_FAIL_FIRST_ATTEMPTS,
    )
