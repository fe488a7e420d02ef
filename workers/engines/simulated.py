"""A stand-in for a GPU engine: a time to first token, a steady token rate and text that is
a pure function of the prompt, so tests and demos are repeatable. The UI labels its output
as simulated."""

import hashlib
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

_WORDS = [
    "stream",
    "graph",
    "token",
    "batch",
    "window",
    "event",
    "lineage",
    "budget",
    "worker",
    "queue",
    "signal",
    "model",
    "river",
    "sluice",
    "gate",
    "flow",
    "current",
    "channel",
    "harbor",
    "summary",
    "insight",
    "detail",
    "result",
    "answer",
    "pattern",
    "signal",
    "careful",
    "quick",
    "steady",
    "clear",
    "bright",
    "measured",
    "durable",
    "exact",
    "honest",
]


class EngineUnavailable(Exception):
    """A transient engine failure: the step is retried per its node's policy."""


@dataclass(frozen=True)
class SimulatedEngine:
    ttft_s: float
    tokens_per_s: float
    # Injected fault: the first N attempts of every request fail, as an overloaded or
    # restarting engine would. Lets tests and demos exercise retries and dead-lettering.
    fail_first_attempts: int = 0
    name: str = "simulated"

    def tokens_for(self, prompt: str, max_tokens: int) -> list[str]:
        """The whole answer for this prompt: same prompt, same words."""
        seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big")
        rng = random.Random(seed)
        # An answer spends between half and all of its token budget.
        half = max(1, max_tokens // 2)
        count = half + seed % (max_tokens - half + 1)
        words = [rng.choice(_WORDS) for _ in range(count)]
        words[0] = words[0].capitalize()
        return [word if i == 0 else " " + word for i, word in enumerate(words)]

    def stream(
        self, prompt: str, max_tokens: int, *, attempt: int, between_tokens: Callable[[], None]
    ) -> Iterator[str]:
        """Yields tokens at the engine's pace. `between_tokens` runs before each token and
        stops generation by raising (cancellation within one decode step)."""
        if attempt <= self.fail_first_attempts:
            raise EngineUnavailable(f"simulated engine: injected fault on attempt {attempt}")
        between_tokens()
        time.sleep(self.ttft_s)
        interval = 1.0 / self.tokens_per_s
        for i, token in enumerate(self.tokens_for(prompt, max_tokens)):
            if i:
                time.sleep(interval)
            between_tokens()
            yield token
