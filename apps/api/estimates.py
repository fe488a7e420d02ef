"""The pre-flight estimate of a batch run, and the same figures from what a run really did.

`estimate_version` says, before a run starts, how many steps each node will take, how many
tokens the LLM nodes will read and write, the engine seconds, the cost at the tenant's model
prices and the wall time at current capacity. `estimate_spec` is the pure part it calls.
`apps.api.measured.actual_for_run` gives a started run's figures in the same shape, so the
API can put the estimate beside what happened. Every default the estimate leans on is
stated, as a sentence, in its `assumptions`.

Capacity is read from settings and from the environment the workers are started with:

- `SLUICE_CPU_CONCURRENCY` (default 2, what `make run` gives the cpu worker): steps at once
  on the cpu queue.
- `SLUICE_GPU_CONCURRENCY` (default 32, as `make run`): threads of the GPU worker, which
  serves the `gpu` queue and every model's `gpu.<model>` queue with them.
- `SLUICE_SIM_TTFT_MS`, `SLUICE_SIM_TOKENS_PER_S`, `SLUICE_SIM_BATCH_CAPACITY`: the simulated
  engine's speed and batch, scaled by a model's own `params` as the engine itself does.
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from apps.api.measured import Capacity, NodeHistory, current_capacity, load_history, money
from apps.graphs.models import GraphVersion
from apps.graphs.validation import Edge, as_edge, node_queue
from apps.tenants.context import current_tenant
from workers.inference.registry import ModelSpec, models_for
from workers.operators import REGISTRY
from workers.operators.builtin import Split, Switch
from workers.operators.llm import DEFAULT_MAX_TOKENS, Generate

JSON = dict[str, Any]

RETRY_ALLOWANCE = 0.02  # steps include 2% for retries
TOKENS_PER_PAGE = 500  # prompt tokens of one page when the profile does not say
CHARS_PER_TOKEN = 4  # a prompt template's rough token count: its length over this
MAX_ITEMS = 1_000_000
MAX_FANOUT = 100_000  # the largest fan-out a split may have (policies.max_fanout's ceiling)
MAX_TOKENS_PER_ITEM = 100_000_000
# Mean seconds of a step of a node with no history, by kind of operator.
CPU_STEP_S = 0.005
HTTP_STEP_S = 0.25
HTTP_TYPES = frozenset({"tool.http", "sink.webhook"})


@dataclass(frozen=True)
class InputProfile:
    items: int  # how many inputs (1..1_000_000)
    pages_per_item: float = 1.0  # items each split node produces per event it splits
    tokens_per_item: int | None = None  # prompt tokens of one whole input; None: 500 a page
    fanout: dict[str, float] = field(default_factory=dict)  # per split node id, overrides


# -- the profile ----------------------------------------------------------------------------


def parse_profile(data: object) -> InputProfile:
    """The profile in `data` (a JSON object); ValueError naming the field otherwise."""
    if not isinstance(data, dict):
        raise ValueError("profile: must be a JSON object")
    unknown = sorted(set(data) - {"items", "pages_per_item", "tokens_per_item", "fanout"})
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown field")
    items = _whole(data.get("items"), "items", 1, MAX_ITEMS)
    if items is None:
        raise ValueError(f"items: is required, a whole number from 1 to {MAX_ITEMS}")
    pages = _positive(data.get("pages_per_item", 1.0), "pages_per_item")
    tokens = _whole(data.get("tokens_per_item"), "tokens_per_item", 0, MAX_TOKENS_PER_ITEM)
    fanout = data.get("fanout", {})
    if not isinstance(fanout, dict):
        raise ValueError("fanout: must be an object of split node id to items per event")
    parsed = {str(key): _positive(value, f"fanout.{key}") for key, value in fanout.items()}
    return InputProfile(items, pages, tokens, parsed)


def _whole(value: object, name: str, low: int, high: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"{name}: must be a whole number from {low} to {high}")
    return value


def _positive(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= MAX_FANOUT:
        raise ValueError(f"{name}: must be a number above 0 and at most {MAX_FANOUT}")
    return float(value)


# -- the estimate -------------------------------------------------------------------------


def estimate_version(version: GraphVersion, profile: InputProfile) -> JSON:
    """The estimate for a run of `version`. Reads the current tenant's history of the graph
    and its model prices, so it must run inside tenant_context."""
    tenant = current_tenant()
    return estimate_spec(
        version.spec,
        profile,
        history=load_history(version),
        capacity=current_capacity(),
        prices=models_for(tenant.model_overrides),
    )


def estimate_spec(
    spec: JSON,
    profile: InputProfile,
    *,
    history: Mapping[str, NodeHistory],
    capacity: Capacity,
    prices: Mapping[str, ModelSpec],
) -> JSON:
    """The estimate for a run of a valid `spec`; pure. ValueError when the profile names a
    fan-out the spec lacks."""
    notes = [f"steps include {RETRY_ALLOWANCE:.0%} for retries"]
    flow = _Flow(spec, profile, notes)
    steps = {node_id: _steps(count) for node_id, count in flow.multiplicity.items()}
    uses_llm = any(node["type"] == Generate.type_name for node in spec["nodes"])
    item_tokens = _item_tokens(profile, flow, notes) if uses_llm else 0.0
    calls = {
        node["id"]: _call(
            node, item_tokens * flow.share[node["id"]], history.get(node["id"]), capacity, prices
        )
        for node in spec["nodes"]
    }
    notes += _call_notes(spec, calls, history)
    tokens_in = sum(steps[node_id] * call.tokens_in for node_id, call in calls.items())
    tokens_out = sum(steps[node_id] * call.tokens_out for node_id, call in calls.items())
    return {
        "steps": {"total": sum(steps.values()), "per_node": steps},
        "tokens": {"in": math.ceil(tokens_in), "out": math.ceil(tokens_out)},
        "gpu_seconds": round(sum(steps[n] * c.engine_seconds for n, c in calls.items()), 3),
        "cost_usd": money(_cost(steps, calls, notes)),
        "wall_seconds": round(_wall(spec, steps, calls, capacity, notes), 3),
        "assumptions": notes,
    }


def _steps(multiplicity: float) -> int:
    # Rounded first: 200,000 x 1.02 is 204000.00000000003 in binary floating point.
    return math.ceil(round(multiplicity * (1 + RETRY_ALLOWANCE), 6))


def _figure(value: float) -> str:
    """A figure for a sentence: 32,831 or 5.17, never 3.28e+04."""
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


class _Flow:
    """How many events reach each node per run, and what share of one input item each
    carries (a page of a 10-page item carries a tenth)."""

    def __init__(self, spec: JSON, profile: InputProfile, notes: list[str]) -> None:
        self.nodes: dict[str, JSON] = {node["id"]: node for node in spec["nodes"]}
        self.fanout = _fanouts(self.nodes, profile, notes)
        self.multiplicity: dict[str, float] = {}
        self.share: dict[str, float] = {}
        self._open_after: dict[str, list[str]] = {}  # fan-outs open on a node's outputs
        incoming = _incoming(spec)
        for node_id in _topological(self.nodes, incoming):
            self._visit(self.nodes[node_id], incoming[node_id], profile.items)
        notes += _switch_notes(self.nodes)

    def _visit(self, node: JSON, edges: list[Edge], items: int) -> None:
        node_id = node["id"]
        opened = list(self._open_after[edges[0].source]) if edges else []
        count = sum(self._emitted(edge.source, edge.port) for edge in edges) if edges else items
        if REGISTRY[node["type"]].is_collect:
            by = node["config"]["by"]
            # It fires once per fan-out it closes, whatever share of the items reach it.
            count = self.multiplicity[by]
            opened = opened[: opened.index(by)] if by in opened else opened
        self.multiplicity[node_id] = count
        self.share[node_id] = 1 / math.prod(self.fanout[split] for split in opened)
        if REGISTRY[node["type"]].opens_scope:
            opened.append(node_id)
        self._open_after[node_id] = opened

    def _emitted(self, node_id: str, port: str) -> float:
        """Events leaving `node_id` on `port` per run."""
        node, count = self.nodes[node_id], self.multiplicity[node_id]
        if node["type"] == Split.type_name:
            return count * self.fanout[node_id]
        if node["type"] == Switch.type_name:
            return count / len(REGISTRY[node["type"]].output_ports(node.get("config", {})))
        return count

    def pages(self, pages_per_item: float) -> float:
        """Pages in one input item: its deepest split's items are its pages."""
        splits = [node_id for node_id in self.nodes if node_id in self.fanout]
        return max((self.fanout[s] / self.share[s] for s in splits), default=pages_per_item)


def _fanouts(nodes: dict[str, JSON], profile: InputProfile, notes: list[str]) -> dict[str, float]:
    splits = [node for node in nodes.values() if node["type"] == Split.type_name]
    for key in profile.fanout:
        if key not in {node["id"] for node in splits}:
            raise ValueError(f"fanout.{key}: the graph has no {Split.type_name} node '{key}'")
    fanout = {}
    for node in splits:
        given = node["id"] in profile.fanout
        fanout[node["id"]] = profile.fanout.get(node["id"], profile.pages_per_item)
        source = "fanout" if given else "pages_per_item"
        notes.append(f"split '{node['id']}': {fanout[node['id']]:g} items per event ({source})")
        limit = node.get("config", {}).get("max_items")
        if limit is not None and fanout[node["id"]] > limit:
            notes.append(
                f"split '{node['id']}': more items per event than its max_items ({limit});"
                " such events would fail"
            )
    return fanout


def _incoming(spec: JSON) -> dict[str, list[Edge]]:
    incoming: dict[str, list[Edge]] = {node["id"]: [] for node in spec["nodes"]}
    for edge in map(as_edge, spec.get("edges", [])):
        incoming[edge.target].append(edge)
    return incoming


def _topological(nodes: dict[str, JSON], incoming: dict[str, list[Edge]]) -> list[str]:
    """Node ids, each after all its parents; in spec order where the edges leave a choice."""
    waiting = {node_id: len(edges) for node_id, edges in incoming.items()}
    children: dict[str, list[str]] = {node_id: [] for node_id in nodes}
    for node_id, edges in incoming.items():
        for edge in edges:
            children[edge.source].append(node_id)
    ready = [node_id for node_id in nodes if not waiting[node_id]]
    order: list[str] = []
    while ready:
        node_id = ready.pop(0)
        order.append(node_id)
        for child in children[node_id]:
            waiting[child] -= 1
            if not waiting[child]:
                ready.append(child)
    if len(order) != len(nodes):
        raise ValueError("the graph has a cycle")
    return order


def _switch_notes(nodes: dict[str, JSON]) -> list[str]:
    notes = []
    for node in nodes.values():
        if node["type"] == Switch.type_name:
            config = node.get("config", {})
            ports = sorted(REGISTRY[node["type"]].output_ports(config))
            default = f", default '{config['default']}' included" if "default" in config else ""
            notes.append(
                f"switch '{node['id']}': its events divided evenly among its {len(ports)}"
                f" ports ({', '.join(ports)}{default})"
            )
    return notes


def _item_tokens(profile: InputProfile, flow: _Flow, notes: list[str]) -> float:
    if profile.tokens_per_item is not None:
        notes.append(f"an input item is {profile.tokens_per_item} prompt tokens (tokens_per_item)")
        return float(profile.tokens_per_item)
    pages = flow.pages(profile.pages_per_item)
    tokens = TOKENS_PER_PAGE * pages
    notes.append(
        f"an input item is {tokens:g} prompt tokens ({TOKENS_PER_PAGE} a page x {pages:g}"
        " pages; tokens_per_item not given)"
    )
    return tokens


# -- one step of a node ---------------------------------------------------------------------


@dataclass
class _Call:
    """One step of a node, on average, and where its figures came from."""

    seconds: float
    seconds_from: str  # "history", or the kind whose default it is
    tokens_in: float = 0.0
    tokens_out: float = 0.0
    engine_seconds: float = 0.0
    model: ModelSpec | None = None
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Engine:
    ttft_s: float
    tokens_per_s: float
    batch: int
    stand_in: bool  # not the simulated engine: its speed is unknown, the settings stand in

    def seconds(self, completion_tokens: float) -> float:
        return self.ttft_s + completion_tokens / self.tokens_per_s


def _engine(model: ModelSpec | None, capacity: Capacity) -> _Engine:
    """The simulated engine's speed, scaled by the model's params as from_settings does."""
    simulated = model is not None and model.simulated
    params = model.params if model is not None and simulated else {}
    return _Engine(
        ttft_s=float(params.get("ttft_ms", capacity.ttft_ms)) / 1000,
        tokens_per_s=float(params.get("tokens_per_s", capacity.tokens_per_s))
        * float(params.get("tokens_per_s_factor", 1.0)),
        batch=int(params.get("batch_capacity", capacity.batch_capacity)),
        stand_in=not simulated,
    )


def _call(
    node: JSON,
    item_share: float,
    past: NodeHistory | None,
    capacity: Capacity,
    prices: Mapping[str, ModelSpec],
) -> _Call:
    measured = past.avg_duration_ms if past is not None else None
    if node["type"] != Generate.type_name:
        if measured is not None:
            return _Call(measured / 1000, "history")
        if node["type"] in HTTP_TYPES:
            return _Call(HTTP_STEP_S, "HTTP operators")
        return _Call(CPU_STEP_S, "cpu operators")
    call = _llm_call(node, item_share, past, capacity, prices)
    if measured is not None:
        call.seconds, call.seconds_from = measured / 1000, "history"
    return call


def _llm_call(
    node: JSON,
    item_share: float,
    past: NodeHistory | None,
    capacity: Capacity,
    prices: Mapping[str, ModelSpec],
) -> _Call:
    label, config = f"llm '{node['id']}'", node.get("config", {})
    name = config.get("model", "default")
    model = prices.get(name)
    template = math.ceil(len(config["prompt"]) / CHARS_PER_TOKEN)
    notes = [
        f"{label}: {template + item_share:.0f} prompt tokens per call ({template} of prompt"
        f" template at {CHARS_PER_TOKEN} characters a token + {item_share:.0f} of input)"
    ]
    if model is None:
        notes.append(f"{label}: model '{name}' is no longer in the registry; costed at 0")
    completion = _completion(label, config, past, notes)
    if past is not None and past.avg_engine_seconds is not None:
        engine_s = past.avg_engine_seconds
        notes.append(
            f"{label}: {_figure(engine_s)} engine seconds per call"
            f" (average of {past.steps} done steps)"
        )
    else:
        engine = _engine(model, capacity)
        engine_s = engine.seconds(completion)
        notes.append(_engine_note(label, name, engine, completion, engine_s))
    return _Call(engine_s, "llm", template + item_share, completion, engine_s, model, notes)


def _completion(label: str, config: JSON, past: NodeHistory | None, notes: list[str]) -> float:
    max_tokens = int(config.get("max_tokens", DEFAULT_MAX_TOKENS))
    if past is not None and past.avg_tokens_out is not None:
        # Capped: the node may have been given a smaller max_tokens since.
        tokens = min(past.avg_tokens_out, max_tokens)
        capped = ", capped at max_tokens" if tokens < past.avg_tokens_out else ""
        notes.append(
            f"{label}: {tokens:.0f} completion tokens per call"
            f" (average of {past.steps} done steps{capped})"
        )
        return tokens
    where = "max_tokens" if "max_tokens" in config else "the default max_tokens"
    notes.append(f"{label}: {max_tokens} completion tokens per call ({where}; no history)")
    return float(max_tokens)


def _engine_note(label: str, name: str, engine: _Engine, completion: float, total: float) -> str:
    note = (
        f"{label}: {_figure(total)} engine seconds per call ({engine.ttft_s * 1000:.0f} ms to"
        f" the first token + {completion:.0f} tokens at {engine.tokens_per_s:g} tokens/s,"
        " the simulated engine's settings; no history)"
    )
    if engine.stand_in:
        note += f"; model '{name}' runs on another engine, whose speed is not known here"
    return note


def _call_notes(
    spec: JSON, calls: Mapping[str, _Call], history: Mapping[str, NodeHistory]
) -> list[str]:
    notes = [note for call in calls.values() for note in call.notes]
    defaults: dict[str, list[str]] = {}
    for node in spec["nodes"]:
        node_id, call = node["id"], calls[node["id"]]
        if call.seconds_from == "history":
            notes.append(
                f"'{node_id}': {_figure(call.seconds * 1000)} ms per step"
                f" (average of {history[node_id].steps} done steps)"
            )
        elif call.seconds_from != "llm":
            defaults.setdefault(call.seconds_from, []).append(node_id)
    for kind, node_ids in defaults.items():
        seconds = calls[node_ids[0]].seconds
        notes.append(
            f"{_figure(seconds * 1000)} ms per step, the default for {kind} with no history:"
            f" {', '.join(node_ids)}"
        )
    return notes


def _cost(steps: Mapping[str, int], calls: Mapping[str, _Call], notes: list[str]) -> Decimal:
    total = Decimal(0)
    priced: dict[str, ModelSpec] = {}
    for node_id, call in calls.items():
        if call.model is not None:
            tokens_in = math.ceil(steps[node_id] * call.tokens_in)
            tokens_out = math.ceil(steps[node_id] * call.tokens_out)
            total += call.model.cost(tokens_in, tokens_out)
            priced[call.model.name] = call.model
    for model in priced.values():
        notes.append(
            f"model '{model.name}': ${model.usd_per_mtok_in} a million prompt tokens,"
            f" ${model.usd_per_mtok_out} a million completion tokens (this tenant's prices)"
        )
    return total


# -- wall time --------------------------------------------------------------------------------


def _wall(
    spec: JSON,
    steps: Mapping[str, int],
    calls: Mapping[str, _Call],
    capacity: Capacity,
    notes: list[str],
) -> float:
    """Queues work in parallel, so the busiest sets the wall time; one item's way along the
    slowest path is its floor, which is what a small run takes."""
    work: dict[str, float] = {}
    for node in spec["nodes"]:
        queue = node_queue(node)
        work[queue] = work.get(queue, 0.0) + steps[node["id"]] * calls[node["id"]].seconds
    parallel = _parallelism(spec, calls, capacity)
    times = {queue: seconds / parallel[queue] for queue, seconds in work.items()}
    gpu = [queue for queue in work if queue == "gpu" or queue.startswith("gpu.")]
    if len(gpu) > 1:
        # The GPU worker's threads serve all of them together.
        times["the GPU worker"] = sum(work[q] for q in gpu) / capacity.gpu_concurrency
    slowest = max(times, key=lambda queue: times[queue])
    path = _longest_path(spec, calls)
    notes += [_parallel_note(queue, parallel[queue], capacity) for queue in sorted(work)]
    notes.append(
        f"wall time: {slowest} is the busiest, {_figure(times[slowest])} s (queues work in"
        f" parallel); one item's way along the slowest path, {_figure(path)} s, is the floor"
    )
    return max(times[slowest], path)


def _parallelism(spec: JSON, calls: Mapping[str, _Call], capacity: Capacity) -> dict[str, int]:
    parallel: dict[str, int] = {}
    for node in spec["nodes"]:
        queue = node_queue(node)
        if node["type"] == Generate.type_name:
            batch = _engine(calls[node["id"]].model, capacity).batch
            parallel[queue] = min(batch, capacity.gpu_concurrency)
        elif queue == "gpu":
            parallel[queue] = capacity.gpu_concurrency
        else:
            parallel[queue] = capacity.cpu_concurrency
    return parallel


def _parallel_note(queue: str, parallel: int, capacity: Capacity) -> str:
    if queue.startswith("gpu."):
        return (
            f"{queue}: {parallel} generations at once (the lower of its engine's batch capacity"
            f" and the GPU worker's {capacity.gpu_concurrency} threads, SLUICE_GPU_CONCURRENCY)"
        )
    if queue == "gpu":
        return f"gpu: {parallel} steps at once (the GPU worker's threads, SLUICE_GPU_CONCURRENCY)"
    return f"{queue}: {parallel} steps at once (worker processes, SLUICE_CPU_CONCURRENCY)"


def _longest_path(spec: JSON, calls: Mapping[str, _Call]) -> float:
    nodes = {node["id"]: node for node in spec["nodes"]}
    incoming = _incoming(spec)
    done: dict[str, float] = {}
    for node_id in _topological(nodes, incoming):
        before = max((done[edge.source] for edge in incoming[node_id]), default=0.0)
        done[node_id] = before + calls[node_id].seconds
    return max(done.values(), default=0.0)
