"""Plans in one place: node specs from infos, a checked plan for a model, its protobuf form
and the checks a node runs before it loads one.

The console (plan, load, rebalance) and the coordinator (recovery) both call `place`; the
node service calls `check`. `node.plan` holds the pure arithmetic (ranges, byte
estimates); this module joins it to model sources and to the wire format.
"""

from __future__ import annotations

from collections.abc import Iterable

from node import PROTOCOL_VERSION
from node.errors import ModelError, OverBudget, StaleEpoch
from node.models import ModelSource, check_range, shape_of, supports_tensor, tensor_refusal
from node.plan import (
    DEFAULT_STRATEGY,
    GIB,
    NodeSpec,
    PartitionPlan,
    PlanError,
    ShardPlan,
    make_plan,
    make_tensor_plan,
    parse_backend,
    tensor_split_problem,
)
from protos import cluster_pb2 as pb

MAX_MICROBATCHES = 64  # decode groups in flight round a pipeline (a forward's max batch)


def node_specs(infos: Iterable[pb.NodeInfo]) -> list[NodeSpec]:
    """What the planner needs from each node's GetInfo, in the nodes' order."""
    return [NodeSpec(i.node_id, i.capabilities.memory_budget, i.name, i.address,
                     i.capabilities.matmul_gflops) for i in infos]


def check_versions(infos_or_specs: Iterable, mine: int = PROTOCOL_VERSION) -> None:
    """Refuse, before anything loads, a plan over a node that speaks another protocol
    version than `mine` (the console's or the coordinator's). Takes NodeInfo messages or
    anything with node_id, name and protocol_version (a NodeSpec, which has none, passes);
    a node that reports 0 predates protocol versions. PlanError names each such node and
    both versions."""
    odd = [n for n in infos_or_specs
           if getattr(n, "protocol_version", mine) != mine]
    if not odd:
        return
    names = "; ".join(
        f"node {n.name or n.node_id} ({n.node_id}) speaks protocol version "
        f"{n.protocol_version or '0 (older than protocol versions)'}" for n in odd)
    raise PlanError(f"{names}, but this plan needs version {mine}: run the same "
                    "mlx-cluster-console release on every node (upgrade it and restart "
                    "mlx-node there), or leave the node out with --nodes")


def place(source: ModelSource, specs: list[NodeSpec], strategy: str, backend: str,
          model: str, context: int | None = None) -> PartitionPlan:
    """A checked plan of `source` over `specs` for `backend` ('pipeline',
    'mlx-ring:tensor' or 'mlx-ring:pipeline'). Raises PlanError saying what to change."""
    name, parallel = parse_backend(backend)
    try:
        if name == "mlx-ring" and parallel == "tensor":
            if not supports_tensor(source):
                raise PlanError(tensor_refusal(source))
            return make_tensor_plan(shape_of(source), source.config, specs, context, model)
        return make_plan(strategy or DEFAULT_STRATEGY, shape_of(source), specs, context=context,
                         model=model)
    except ModelError as e:
        raise PlanError(str(e)) from e


def to_proto(plan: PartitionPlan, model: str, epoch: int, backend: str = "pipeline",
             ring_ports: dict[str, int] | None = None, auto_reform: bool = False,
             rejoin_settle_s: float | None = None) -> pb.Plan:
    """The wire form of a plan. `ring_ports` (node id -> port) is used by mlx-ring only.
    `rejoin_settle_s` (None: no automatic joins) lets a gRPC pipeline take in nodes that
    join once they have been up that long (node/membership.py)."""
    name, parallel = parse_backend(backend)
    ports = ring_ports if name == "mlx-ring" and ring_ports else {}
    rejoin = rejoin_settle_s is not None and name == "pipeline"
    return pb.Plan(model=model, epoch=epoch, n_layers=plan.n_layers, strategy=plan.strategy,
                   context_length=plan.context, backend=name, parallel=parallel,
                   auto_reform=auto_reform and name == "mlx-ring", auto_rejoin=rejoin,
                   rejoin_settle_s=rejoin_settle_s if rejoin else 0.0,
                   shards=[pb.PlanShard(node_id=s.node.node_id, address=s.node.address,
                                        name=s.node.name, start_layer=s.start,
                                        end_layer=s.end, param_bytes=s.param_bytes,
                                        kv_bytes=s.kv_bytes,
                                        ring_port=ports.get(s.node.node_id, 0),
                                        macs_per_token=s.macs)
                           for s in plan.shards])


def from_proto(plan: pb.Plan, budgets: dict[str, int] | None = None) -> PartitionPlan:
    """A wire plan back as a PartitionPlan (budgets are 0 unless given by node id)."""
    budgets = budgets or {}
    return PartitionPlan(plan.strategy, plan.n_layers, plan.context_length, [
        ShardPlan(NodeSpec(s.node_id, budgets.get(s.node_id, 0), s.name, s.address),
                  s.start_layer, s.end_layer, s.param_bytes, s.kv_bytes, s.macs_per_token)
        for s in plan.shards])


def next_epoch(infos: Iterable[pb.NodeInfo]) -> int:
    """One more than the newest epoch any node holds."""
    return max((max(i.shard.epoch if i.HasField("shard") else 0, i.accepted_epoch)
                for i in infos), default=0) + 1


def check(plan: pb.Plan, source: ModelSource | None = None) -> None:
    """What a node checks before it loads its part of `plan` (ModelError says what is
    wrong): pipeline shards contiguous from layer 0 covering every layer once; a tensor
    plan giving every rank every layer of a model whose heads split that many ways."""
    if plan.backend == "mlx-ring" and (plan.parallel or "tensor") == "tensor":
        if any((s.start_layer, s.end_layer) != (0, plan.n_layers - 1) for s in plan.shards):
            raise ModelError("a tensor-parallel plan gives every rank all layers "
                             f"0-{plan.n_layers - 1}")
        if source is None:
            return
        if not supports_tensor(source):
            raise ModelError(tensor_refusal(source))
        problem = tensor_split_problem(source.config, len(plan.shards))
        if problem:
            raise ModelError(f"{plan.model} cannot be split tensor-parallel over "
                             f"{len(plan.shards)} ranks: {problem}")
        return
    expected = 0
    for s in plan.shards:
        if s.start_layer != expected or s.end_layer < s.start_layer:
            raise ModelError(f"plan shards must be contiguous from layer 0: shard "
                             f"{s.start_layer}-{s.end_layer} should start at {expected}")
        expected = s.end_layer + 1
    if expected != plan.n_layers:
        raise ModelError(f"plan covers layers 0-{expected - 1} but the model has {plan.n_layers}")


def check_budget(source: ModelSource, start: int, end: int, context: int, budget: int) -> None:
    """Refuse, before loading anything, a shard that would not fit a node's budget."""
    params, kv = shape_of(source).shard_bytes(start, end, context or None)
    if params + kv > budget:
        raise OverBudget(
            f"layers {start}-{end} of {source.spec} need {(params + kv) / GIB:.2f} GiB "
            f"({params / GIB:.2f} GiB weights + {kv / GIB:.2f} GiB KV cache) but this node's "
            f"memory budget is {budget / GIB:.2f} GiB; plan with --strategy memory or "
            f"start the node with a larger --memory-budget")


def own_shard(plan: pb.Plan, node_id: str, loaded_epoch: int,
              accepted_epoch: int = 0) -> pb.PlanShard:
    """This node's shard of a plan it was asked to load, after the checks that need no
    model: one shard for this node, an epoch newer than any it accepted (each epoch is
    accepted once, so two coordinators can never install different plans under one
    epoch), a known backend, and ranges that make sense for it."""
    mine = [s for s in plan.shards if s.node_id == node_id]
    if len(mine) != 1:
        raise ModelError(f"the plan names this node ({node_id}) {len(mine)} times; "
                         "each node must hold exactly one shard")
    if plan.epoch < loaded_epoch:
        raise StaleEpoch(f"plan epoch {plan.epoch} is older than the loaded epoch "
                         f"{loaded_epoch}")
    if plan.epoch <= accepted_epoch:
        raise StaleEpoch(f"plan epoch {plan.epoch} was already taken: this node accepted "
                         f"epoch {accepted_epoch}; plan again (mlx-cluster load picks a "
                         "newer epoch)")
    if plan.backend not in ("", "pipeline", "mlx-ring"):
        raise ModelError(f"unknown backend {plan.backend!r} in the plan")
    if plan.microbatches > MAX_MICROBATCHES:
        raise ModelError(f"the plan asks for {plan.microbatches} micro-batches; at most "
                         f"{MAX_MICROBATCHES} (mlx-cluster load --microbatches K)")
    check(plan)
    return mine[0]


def check_source(plan: pb.Plan, ours: pb.PlanShard, source: ModelSource, budget: int) -> None:
    """The checks that need the model: its layer count, this shard's range, a tensor
    plan's split, this node's budget, and a ring port for every mlx-ring rank."""
    if source.n_layers != plan.n_layers:
        raise ModelError(f"the plan says {plan.n_layers} layers but {plan.model} has "
                         f"{source.n_layers}")
    check_range(ours.start_layer, ours.end_layer, source.n_layers)
    if plan.backend == "mlx-ring" and (plan.parallel or "tensor") == "tensor":
        check(plan, source)
    else:
        check_budget(source, ours.start_layer, ours.end_layer, plan.context_length, budget)
    if plan.backend == "mlx-ring" and any(not s.ring_port for s in plan.shards):
        raise ModelError("an mlx-ring plan needs a ring_port for every rank")
