"""Partition planning: which contiguous layer range each node holds. Pure functions, no I/O.

Ranges are inclusive at both ends, as in exo's Shard: (0, 9) is ten layers. Every plan
comes with a memory estimate per node (parameters, KV cache at the context length) and
is refused, with the shortfall in the message, when any node would go over its budget.

Strategies:
- `ring-memory-weighted`: exo's, kept for comparison: nodes sorted by memory (largest
  first), float cut points rounded per node (the rounding that over-filled exo nodes).
- `balanced` (the default): the split whose slowest stage is fastest. A stage's time is its
  multiply-adds per token (its layers', and the output head's on the last stage, counted
  from mlx-lm's own model) over its node's measured speed. With micro-batches in flight
  the slowest stage sets the pace, and a count of layers does not say which stage that
  is: smollm2-135m's tied head is a fifth of a token's work, all on the last stage.
- `memory`: largest remainder over memory budgets, capped by what each node can hold.
- `speed`: largest remainder over calibrated speed, within the same memory caps.
- `uniform`: equal counts, within the memory caps.
- `manual:0-9,10-19,20-29`: ranges in node order, checked.

Backends: `pipeline` (gRPC, the ranges above), `mlx-ring:pipeline` (the same ranges, run
by an mx.distributed ring group) and `mlx-ring:tensor` (every rank holds every layer,
split by heads and MLP columns with mlx-lm's `model.shard`; the ranges are not used).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from node.splits import (  # noqa: F401 - callers import the split arithmetic from here too
    PlanError,
    capped_largest_remainder,
    exo_ring_memory_weighted,
    largest_remainder,
    parse_manual,
    ranges_from_counts,
)

GIB = 1024**3
STRATEGIES = ("balanced", "memory", "ring-memory-weighted", "speed", "uniform",
              "manual:A-B,C-D,...")
DEFAULT_STRATEGY = "balanced"
# Speeds within this factor of each other count as equal: a node's one-second matmul
# calibration on a busy host varies about this much between runs, and a split that
# followed the noise would move layers between equal machines from one load to the next.
SPEED_NOISE = 1.2
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
BACKENDS = ("pipeline", "mlx-ring:tensor", "mlx-ring:pipeline")


@dataclass(frozen=True)
class NodeSpec:
    """What the planner needs to know about a node."""

    node_id: str
    budget: int  # bytes the node may use for its shard
    name: str = ""
    address: str = ""
    speed: float = 0.0  # calibrated GFLOP/s; 0 = unknown

    @property
    def label(self) -> str:
        return self.name or self.address or self.node_id


@dataclass(frozen=True)
class ModelShape:
    """Byte sizes of a model's parts, for memory estimates.

    The scalar fields describe a uniform model (the llama formula of `model_shape`). A
    measured shape (`node.sizes.measure_shape`) also carries one entry per layer, which
    take precedence: parameter bytes, K+V bytes per position, and the number of positions
    a layer's cache keeps at most (a sliding-window layer's window; 0 = it grows with the
    context). The scalar fields are then the per-layer means (rounded up)."""

    n_layers: int
    layer_bytes: int  # parameters of one transformer block
    embed_bytes: int  # input embedding (first shard)
    head_bytes: int  # final norm + output projection (last shard; the embedding when tied)
    kv_bytes_per_token: int  # K and V of one layer for one position
    context_length: int
    layer_sizes: tuple[int, ...] = ()  # parameter bytes of each layer; () = layer_bytes each
    kv_per_token: tuple[int, ...] = ()  # K+V bytes per position of each layer
    kv_window: tuple[int, ...] = ()  # positions each layer's cache keeps at most; 0 = all
    tied_bytes: int = 0  # the embedding inside head_bytes (tied head): held once by one shard
    # multiply-adds per token of each layer's weights and of the output head (0: unknown)
    layer_macs: tuple[int, ...] = ()
    head_macs: int = 0

    def __post_init__(self) -> None:
        for name in ("layer_sizes", "kv_per_token", "kv_window", "layer_macs"):
            sizes = getattr(self, name)
            if sizes and len(sizes) != self.n_layers:
                raise ValueError(f"ModelShape.{name} has {len(sizes)} entries for "
                                 f"{self.n_layers} layers")

    def layer_params(self, start: int, end: int) -> int:
        """Parameter bytes of layers start..end (inclusive)."""
        if self.layer_sizes:
            return sum(self.layer_sizes[start:end + 1])
        return (end - start + 1) * self.layer_bytes

    def stage_macs(self, start: int, end: int) -> int:
        """Multiply-adds per token of layers start..end, with the head on the last stage
        (0 when the shape does not count them)."""
        if not self.layer_macs:
            return 0
        head = self.head_macs if end == self.n_layers - 1 else 0
        return sum(self.layer_macs[start:end + 1]) + head

    def kv_bytes(self, start: int, end: int, context: int) -> int:
        """KV-cache bytes of layers start..end at `context` positions, windows respected."""
        total = 0
        for i in range(start, end + 1):
            per = self.kv_per_token[i] if self.kv_per_token else self.kv_bytes_per_token
            window = self.kv_window[i] if self.kv_window else 0
            total += per * (min(context, window) if window else context)
        return total

    def per_layer_bytes(self, context: int) -> int:
        """Mean bytes of one layer, parameters plus KV cache at `context` (rounded up)."""
        if not self.n_layers:
            return 0
        last = self.n_layers - 1
        total = self.layer_params(0, last) + self.kv_bytes(0, last, context)
        return -(-total // self.n_layers)

    def shard_bytes(self, start: int, end: int, context: int | None = None) -> tuple[int, int]:
        """(parameter bytes, KV-cache bytes at `context` positions) of layers start..end."""
        params = self.layer_params(start, end)
        if start == 0:
            params += self.embed_bytes
        if end == self.n_layers - 1:
            params += self.head_bytes
            if start == 0:
                params -= self.tied_bytes  # one module serves as embedding and head
        ctx = self.context_length if context is None else context
        return params, self.kv_bytes(start, end, ctx)


def model_shape(config: dict, dtype: str, bits: int = 0, context: int = 0) -> ModelShape:
    """Sizes of a llama-family model from its config; `bits` > 0 for quantized weights.

    The formula fallback for callers without mlx-lm; `node.sizes.measure_shape` measures
    any mlx-lm architecture exactly."""
    h = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or h // heads)
    inter = int(config["intermediate_size"])
    vocab = int(config["vocab_size"])
    act = DTYPE_BYTES.get(dtype, 4)
    # quantized: bits per weight plus a float scale and bias per group of 32
    per_weight = bits / 8 + 2 * act / 32 if bits else act
    matrices = h * heads * head_dim * 2 + h * kv_heads * head_dim * 2 + 3 * h * inter
    layer = int(matrices * per_weight) + 2 * h * act
    embed = int(vocab * h * per_weight)
    tied = config.get("tie_word_embeddings", True)
    head = h * act + (embed if tied else int(vocab * h * per_weight))
    return ModelShape(
        n_layers=int(config["num_hidden_layers"]), layer_bytes=layer, embed_bytes=embed,
        head_bytes=head, kv_bytes_per_token=2 * kv_heads * head_dim * act,
        context_length=context or int(config.get("max_position_embeddings") or 4096),
        tied_bytes=embed if tied else 0,
        layer_macs=(matrices,) * int(config["num_hidden_layers"]), head_macs=vocab * h)


@dataclass(frozen=True)
class ShardPlan:
    node: NodeSpec
    start: int
    end: int
    param_bytes: int
    kv_bytes: int
    macs: int = 0  # multiply-adds per token of this stage (0: not counted)

    @property
    def layers(self) -> int:
        return self.end - self.start + 1

    @property
    def total_bytes(self) -> int:
        return self.param_bytes + self.kv_bytes


@dataclass(frozen=True)
class PartitionPlan:
    strategy: str
    n_layers: int
    context: int
    shards: list[ShardPlan] = field(default_factory=list)

    @property
    def ranges(self) -> list[tuple[int, int]]:
        return [(s.start, s.end) for s in self.shards]


# ------------------------------------------------------------------ plans


def _caps(shape: ModelShape, nodes: list[NodeSpec], context: int) -> list[int]:
    """How many layers each node can hold at its position in the order (of mean size: the
    exact check of every shard follows)."""
    per_layer = shape.per_layer_bytes(context)
    caps = []
    for i, node in enumerate(nodes):
        fixed = (shape.embed_bytes if i == 0 else 0) + (
            shape.head_bytes if i == len(nodes) - 1 else 0)
        caps.append(max(0, (node.budget - fixed) // per_layer) if per_layer else shape.n_layers)
    return caps


def _fits_or_explain(shape: ModelShape, nodes: list[NodeSpec], caps: list[int],
                     context: int, model: str) -> None:
    per_layer = shape.per_layer_bytes(context)
    params, kv = shape.shard_bytes(0, shape.n_layers - 1, context)
    # more than one node: the first holds the embedding, the last its own (tied) copy
    need = params + kv + (shape.tied_bytes if len(nodes) > 1 else 0)
    have = sum(n.budget for n in nodes)
    if sum(caps) < shape.n_layers or need > have:
        raise PlanError(
            f"{model or 'the model'} does not fit: it needs {need / GIB:.2f} GiB "
            f"({shape.n_layers} layers x {per_layer / GIB:.3f} GiB incl. KV cache at {context} "
            f"tokens, + {(shape.embed_bytes + shape.head_bytes) / GIB:.2f} GiB embedding/head) "
            f"but the nodes' budgets total {have / GIB:.2f} GiB and hold at most {sum(caps)} "
            f"layers: {max(need - have, per_layer * (shape.n_layers - sum(caps))) / GIB:.2f} "
            f"GiB short. Add nodes, raise --memory-budget, use a smaller --dtype or a "
            f"shorter context.")
    tiny = [n.label for n, c in zip(nodes, caps) if c < 1]
    if tiny:
        raise PlanError(f"node(s) {', '.join(tiny)} cannot hold even one layer "
                        f"({per_layer / GIB:.3f} GiB); leave them out with --nodes")


def parse_backend(text: str) -> tuple[str, str]:
    """'pipeline' | 'mlx-ring[:tensor|pipeline]' -> (backend, parallel)."""
    name, _, parallel = (text or "pipeline").partition(":")
    if name == "pipeline" and not parallel:
        return "pipeline", ""
    if name == "mlx-ring" and parallel in ("", "tensor", "pipeline"):
        return "mlx-ring", parallel or "tensor"
    raise PlanError(f"unknown backend {text!r}; choose one of {', '.join(BACKENDS)}")


def backend_label(backend: str, parallel: str) -> str:
    return "pipeline" if backend in ("", "pipeline") else f"{backend}:{parallel}"


def tensor_split_problem(config: dict, ways: int) -> str | None:
    """Why a llama-family model cannot be split `ways` ways tensor-parallel (None: it can).

    mlx-lm's `shard` gives every rank n_heads/N query heads, n_kv_heads/N KV heads and
    intermediate/N MLP columns; each must divide exactly."""
    if ways < 1:
        return "a tensor-parallel group needs at least one rank"
    parts = {"attention heads": int(config["num_attention_heads"]),
             "KV heads": int(config.get("num_key_value_heads") or
                             config["num_attention_heads"]),
             "MLP columns (intermediate_size)": int(config["intermediate_size"])}
    bad = [f"{n} {what}" for what, n in parts.items() if n % ways]
    if not bad:
        return None
    fits = [k for k in range(2, 9) if all(n % k == 0 for n in parts.values())]
    return (f"its {' and '.join(bad)} do not divide by {ways} ranks; tensor parallel "
            f"works on {', '.join(map(str, fits)) or 'no'} node(s) for this model "
            f"(or use --backend mlx-ring:pipeline)")


def make_tensor_plan(shape: ModelShape, config: dict, nodes: list[NodeSpec],
                     context: int | None = None, model: str = "") -> PartitionPlan:
    """Every node holds every layer, 1/N of each: weights and KV cache split N ways,
    embedding and head replicated (as mlx-lm's `shard` leaves them)."""
    if not nodes:
        raise PlanError("no nodes to plan over")
    problem = tensor_split_problem(config, len(nodes))
    if problem:
        raise PlanError(f"{model or 'the model'} cannot be split tensor-parallel over "
                        f"{len(nodes)} node(s): {problem}")
    ctx = shape.context_length if context is None else context
    n, last = len(nodes), shape.n_layers - 1
    params = (shape.layer_params(0, last) // n + shape.embed_bytes + shape.head_bytes
              - shape.tied_bytes)
    kv = shape.kv_bytes(0, last, ctx) // n
    macs = shape.stage_macs(0, last) // n
    shards = [ShardPlan(node, 0, last, params, kv, macs) for node in nodes]
    over = [s for s in shards if s.total_bytes > s.node.budget]
    if over:
        s = over[0]
        raise PlanError(f"a 1/{n} tensor-parallel share of {model or 'the model'} needs "
                        f"{s.total_bytes / GIB:.2f} GiB but {s.node.label}'s budget is "
                        f"{s.node.budget / GIB:.2f} GiB: add nodes or use a smaller --dtype")
    return PartitionPlan("tensor", shape.n_layers, ctx, shards)


def make_plan(strategy: str, shape: ModelShape, nodes: list[NodeSpec],
              context: int | None = None, model: str = "") -> PartitionPlan:
    """A checked plan: ranges for the strategy, estimates per node, budgets respected."""
    if not nodes:
        raise PlanError("no nodes to plan over")
    ctx = shape.context_length if context is None else context
    if strategy == "ring-memory-weighted":
        nodes = sorted(nodes, key=lambda n: (n.budget, n.node_id), reverse=True)
    caps = _caps(shape, nodes, ctx)
    if strategy.startswith("manual:"):
        ranges = parse_manual(strategy[len("manual:"):], shape.n_layers, len(nodes))
    elif strategy == "ring-memory-weighted":
        ranges = exo_ring_memory_weighted(shape.n_layers, [n.budget for n in nodes])
    elif strategy == "balanced":
        if shape.n_layers < len(nodes):
            raise PlanError(f"{shape.n_layers} layers cannot be split over {len(nodes)} nodes "
                            f"(each needs >= 1); use fewer nodes")
        _fits_or_explain(shape, nodes, caps, ctx, model)
        ranges = balanced_ranges(shape, nodes, ctx)
        if ranges is None:
            raise PlanError(f"no split of {model or 'the model'} into contiguous stages fits "
                            "every node's memory budget; try --strategy memory")
    elif strategy in ("memory", "speed", "uniform"):
        if shape.n_layers < len(nodes):
            raise PlanError(f"{shape.n_layers} layers cannot be split over {len(nodes)} nodes "
                            f"(each needs >= 1); use fewer nodes")
        _fits_or_explain(shape, nodes, caps, ctx, model)
        if strategy == "memory":
            weights = [float(n.budget) for n in nodes]
        elif strategy == "speed":
            weights = [n.speed or float(n.budget) for n in nodes]
            if not all(n.speed for n in nodes):
                weights = [float(n.budget) for n in nodes]  # not all calibrated: by memory
        else:
            weights = [1.0] * len(nodes)
        ranges = ranges_from_counts(capped_largest_remainder(shape.n_layers, weights, caps))
    else:
        raise PlanError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    shards = []
    for node, (start, end) in zip(nodes, ranges):
        params, kv = shape.shard_bytes(start, end, ctx)
        shards.append(ShardPlan(node, start, end, params, kv, shape.stage_macs(start, end)))
    over = [s for s in shards if s.total_bytes > s.node.budget]
    if over:
        s = over[0]
        raise PlanError(
            f"{strategy} puts layers {s.start}-{s.end} ({s.total_bytes / GIB:.2f} GiB) on "
            f"{s.node.label}, whose budget is {s.node.budget / GIB:.2f} GiB: "
            f"{(s.total_bytes - s.node.budget) / GIB:.2f} GiB over. Try --strategy memory.")
    return PartitionPlan(strategy, shape.n_layers, ctx, shards)


def relative_speeds(nodes: list[NodeSpec]) -> list[float]:
    """Each node's speed for the balanced split: its calibrated speed, or 1 for all when
    any is unknown or all are within SPEED_NOISE of each other."""
    speeds = [n.speed for n in nodes]
    if not all(s > 0 for s in speeds) or max(speeds) <= min(speeds) * SPEED_NOISE:
        return [1.0] * len(nodes)
    return speeds


def balanced_ranges(shape: ModelShape, nodes: list[NodeSpec],
                    context: int) -> list[tuple[int, int]] | None:
    """Contiguous ranges, one per node in order, that minimise the slowest stage's time
    within every node's memory budget (None: no split fits). Dynamic programming over
    (node, first layer) with prefix sums: N x L^2 steps, a few milliseconds for hundreds of
    layers. Layers the shape does not count (no `layer_macs`) weigh by their bytes."""
    n, total = len(nodes), shape.n_layers
    last = total - 1
    if shape.layer_macs:
        work, head = list(shape.layer_macs), shape.head_macs
    else:
        work = [shape.layer_params(i, i) for i in range(total)]
        head = shape.head_bytes - shape.tied_bytes
    speeds = relative_speeds(nodes)
    prefix = [0]
    for w in work:
        prefix.append(prefix[-1] + w)

    def cost(k: int, start: int, end: int) -> float:
        return (prefix[end + 1] - prefix[start] + (head if end == last else 0)) / speeds[k]

    def fits(k: int, start: int, end: int) -> bool:
        params, kv = shape.shard_bytes(start, end, context)
        return params + kv <= nodes[k].budget

    inf = float("inf")
    # best[k][j]: the slowest stage of the best split of layers j.. over nodes k..
    best = [[inf] * (total + 1) for _ in range(n + 1)]
    cut: list[list[int]] = [[0] * (total + 1) for _ in range(n + 1)]
    best[n][total] = 0.0
    for k in range(n - 1, -1, -1):
        left = n - k - 1  # nodes after this one, each needing a layer
        for j in range(total - left - 1, -1, -1):
            for end in range(j, total - left):
                rest = best[k + 1][end + 1]
                here = cost(k, j, end)
                if max(here, rest) < best[k][j] and fits(k, j, end):
                    best[k][j], cut[k][j] = max(here, rest), end
    if best[0][0] == inf:
        return None
    ranges, j = [], 0
    for k in range(n):
        ranges.append((j, cut[k][j]))
        j = cut[k][j] + 1
    return ranges


def stage_seconds(shape_macs: int, rows: int, gflops: float) -> float:
    """Predicted time of one forward of a stage: 2 FLOPs per multiply-add, per row, at the
    node's calibrated speed (0 when either is unknown)."""
    return 2.0 * shape_macs * rows / (gflops * 1e9) if shape_macs and gflops > 0 else 0.0


def plan_ranges(strategy: str, n_layers: int, budgets: list[int]) -> list[tuple[int, int]]:
    """Ranges only, for callers without model sizes (no memory caps are applied)."""
    shape = ModelShape(n_layers, 0, 0, 0, 0, 0)
    nodes = [NodeSpec(str(i), b) for i, b in enumerate(budgets)]
    return make_plan(strategy, shape, nodes).ranges


def layer_bar(start: int, end: int, n_layers: int, width: int = 30) -> str:
    """A text bar of the whole layer list with this shard's range filled in."""
    width = min(width, n_layers) if n_layers < width else width
    a = math.floor(start * width / n_layers)
    b = max(a + 1, math.ceil((end + 1) * width / n_layers))
    return "·" * a + "█" * (b - a) + "·" * (width - b)
