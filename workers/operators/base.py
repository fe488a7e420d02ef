"""What an operator is: a typed config schema, the ports it emits on, and a `run` that turns
input events into outputs. Operators never touch the database; the executor commits what
they return in one transaction."""

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from workers.queues import Queue

if TYPE_CHECKING:
    from workers.inference.base import GenerationRequest
    from workers.inference.host import Generation
    from workers.inference.registry import ModelSpec

JSON = dict[str, Any]


class PermanentError(Exception):
    """Bad data or config: retrying cannot help, so the step goes straight to dead."""


class RetrySoon(Exception):
    """A transient failure whose next attempt should come after `retry_in_s` rather than the
    node's backoff: flow control already slows the provider down, and the next attempt is
    routed afresh (to a fallback, or held while the breaker is open)."""

    def __init__(self, message: str, *, retry_in_s: float) -> None:
        super().__init__(message)
        self.retry_in_s = retry_in_s


class Deferred(Exception):
    """The step cannot be served now and must wait (flow control: every model it may use is
    throttled, its breaker is open, or higher-priority work goes first). It goes back to the
    queue for `wait_s` without using up an attempt; `reason` is shown on the step."""

    def __init__(self, reason: str, *, wait_s: float) -> None:
        super().__init__(reason)
        self.wait_s = wait_s


class StepCancelled(Exception):
    """The run was cancelled (or its deadline passed) while this step was running."""


class LeaseLost(Exception):
    """Another worker owns this step now; this attempt's results must be thrown away."""


class DeadlinePassed(StepCancelled):
    """The run's deadline passed: the whole run stops."""


class StepDeadlinePassed(StepCancelled):
    """The node's ttl_s ran out for this step: it fails, the run goes on."""


class BudgetExceeded(StepCancelled):
    """The run's or the tenant's budget is spent: the run ends `budget_exceeded`. The
    message states the figure."""


def stop_exception(kind: str, detail: str = "") -> Exception:
    """The exception a step raises when a stop signal of this kind ended its work."""
    if kind == "lease_lost":
        return LeaseLost(detail)
    if kind == "deadline":
        return DeadlinePassed("deadline passed")
    if kind == "step_deadline":
        return StepDeadlinePassed("deadline")
    if kind in ("budget", "budget_exceeded"):
        return BudgetExceeded(detail or "budget exceeded")
    return StepCancelled(f"run {kind}")


@dataclass(frozen=True)
class InputEvent:
    id: str
    payload: JSON
    # Item indexes from the fan-out that matters to this step inwards: a collect sorts by it.
    order: tuple[int, ...] = ()


@dataclass(frozen=True)
class Output:
    payload: JSON
    port: str = "out"


@dataclass(frozen=True)
class UsageRecord:
    """What one attempt consumed, whether it finished, failed or was stopped."""

    model: str
    engine: str
    tokens_in: int  # prompt tokens
    tokens_out: int  # completion tokens, wasted ones included
    engine_seconds: float
    cost_usd: Decimal
    # Tokens generated after a stop signal: paid for, read by nobody.
    wasted_tokens: int = 0
    # From the stop signal to the engine no longer generating.
    stop_latency_ms: float | None = None
    # Why this model served the step when it was not simply the one asked for.
    route: str = ""


@dataclass
class StepResult:
    outputs: list[Output] = field(default_factory=list)
    # (table, row) pairs a sink writes in the same transaction as the step's completion.
    table_rows: list[tuple[str, JSON]] = field(default_factory=list)


class SpendMeter(Protocol):
    """The run's and tenant's budgets as a step sees them."""

    def check_start(self, cost: Decimal) -> None:
        """Raises BudgetExceeded when spending `cost` more would cross a budget."""

    def add(self, cost: Decimal) -> str | None:
        """Counts spending as it happens; returns the reason once a budget is crossed."""


class NoBudget:
    def check_start(self, cost: Decimal) -> None:
        return None

    def add(self, cost: Decimal) -> str | None:
        return None


class TokenSink(Protocol):
    """Where a generating step sends its tokens as they come (the run's live feed)."""

    def write(self, text: str, tokens: int, at: float) -> None: ...

    def close(self) -> None: ...


class NoTokens:
    def write(self, text: str, tokens: int, at: float) -> None:
        return None

    def close(self) -> None:
        return None


# perform_effect(name, request, call): runs call(idempotency_key) through the effect ledger,
# at most once to completion across every attempt of the step; returns the recorded result.
EffectRunner = Callable[[str, JSON, Callable[[str], JSON]], JSON]


def no_effects(name: str, request: JSON, call: Callable[[str], JSON]) -> JSON:
    raise RuntimeError("this step context has no effect ledger")


class SecretNotAvailable(LookupError):
    """The tenant has no secret of that name, or its value cannot be decrypted; the message
    names the secret and what to do, never the value."""


def no_secrets(name: str) -> str:
    raise SecretNotAvailable(f"secret {name!r}: this step context reads no secrets")


@dataclass(frozen=True)
class StepContext:
    run_id: str
    step_id: str
    node_id: str
    config: JSON
    attempt: int
    max_fanout: int
    # Raises StepCancelled (run cancelled, a deadline passed) or LeaseLost. Cheap to call
    # often; the lease itself is renewed in the background.
    heartbeat: Callable[[], None]
    perform_effect: EffectRunner = no_effects
    # Hosts this tenant lets outbound HTTP reach although they resolve to private addresses.
    outbound_allowlist: frozenset[str] = frozenset()
    # read_secret(name): the plaintext of the tenant's secret; raises SecretNotAvailable.
    read_secret: Callable[[str], str] = no_secrets
    # For a collect: the items of its fan-out that failed, when its policy collects anyway.
    failures: tuple[JSON, ...] = ()
    # Inference: the model registry as this tenant sees it, how to start a generation owned
    # by this step (registered for stop signals, with the deadlines armed), the budgets, and
    # where to report what the attempt consumed (recorded however the step ends).
    models: Mapping[str, "ModelSpec"] = field(default_factory=dict)
    start_generation: Callable[["ModelSpec", "GenerationRequest"], "Generation"] | None = None
    budget: SpendMeter = field(default_factory=NoBudget)
    report_usage: Callable[[UsageRecord], None] = lambda usage: None
    # Opens this attempt's token stream to the run's live feed; close it when generation ends.
    open_token_stream: Callable[[], TokenSink] = NoTokens
    # Load shedding: (this tenant's steps waiting on this step's queue, how many of them have
    # a higher priority than this step).
    waiting_ahead: Callable[[], tuple[int, int]] = lambda: (0, 0)


@dataclass(frozen=True)
class SpecIssue:
    """A problem with one node's config, found by the operator's own checks."""

    field: str
    message: str
    # Most issues are about the config; a few about the node itself (its resources).
    in_config: bool = True


class Operator:
    type_name: ClassVar[str]
    description: ClassVar[str]
    config_schema: ClassVar[JSON] = {"type": "object", "additionalProperties": False}
    default_queue: ClassVar[Queue] = Queue.CPU
    # A source starts the graph: it has no incoming edges and receives the run's input.
    is_source: ClassVar[bool] = False
    # A fan-out's outputs are items of a new scope; a collect consumes one scope's items at once.
    opens_scope: ClassVar[bool] = False
    is_collect: ClassVar[bool] = False
    # Cheap: pure, fast and local (no calls out, no inference). The engine may run a cheap
    # node's step right after its predecessor's on the same worker and commit both at once
    # (a chain, DESIGN "Two executors, one graph").
    cheap: ClassVar[bool] = False
    # Gets the model registry, the budgets and a way to start generations in its context.
    uses_inference: ClassVar[bool] = False
    # Not cheap, yet runs inside a stream segment on the Kafka worker: a sink whose records
    # the worker produces with the micro-batch, acknowledged before the batch commits.
    segment_sink: ClassVar[bool] = False
    # Keeps state between records (windows, memory): runs only in a Kafka stream segment,
    # which gives it its partition's state; a step's output for it is relayed there.
    stateful: ClassVar[bool] = False

    def queue(self, node: JSON) -> str:
        """The Celery queue this node's steps run on."""
        return str(node.get("resources", {}).get("queue", self.default_queue.value))

    def output_ports(self, config: JSON) -> set[str]:
        return {"out"}

    def check(
        self, node_id: str, config: JSON, nodes: dict[str, JSON], parents: dict[str, set[str]]
    ) -> list[SpecIssue]:
        """Checks beyond the JSON schema (template syntax, references to other nodes)."""
        return []

    def run(self, ctx: StepContext, inputs: list[InputEvent]) -> StepResult:
        raise NotImplementedError


REGISTRY: dict[str, Operator] = {}


def register(cls: type[Operator]) -> type[Operator]:
    if cls.type_name in REGISTRY:
        raise RuntimeError(f"operator type {cls.type_name!r} is registered twice")
    REGISTRY[cls.type_name] = cls()
    return cls
