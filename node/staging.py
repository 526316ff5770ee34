"""A new plan loaded beside the one that serves, so that a re-plan is no outage.

When a node's memory budget holds both its current shard and its share of a new plan,
`LoadShard` with `stage` loads the new shard while the old plan keeps serving: the load
runs on the MLX thread in short steps (node.models.load_steps), so the old plan's forwards
go on between them. The new plan waits, fully loaded, until `Activate`: the node then
switches to it at once, the requests in flight go on under it from the token they had
reached (node/failover.py replays them), and the old weights are freed. The console
(console/ops.py) and the coordinator's joins (node/coordinator.py) stage every node
first, then activate them together, so the switch costs a token or two, not a load.
Where the memory is not there for both, the node loads as before: the old plan goes
first, and requests wait for the new one.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor
from dataclasses import dataclass

from node.models import ModelSource, Shard, load_steps
from protos import cluster_pb2 as pb


@dataclass
class Staged:
    """A loaded plan that does not serve yet."""

    plan: pb.Plan
    options: pb.ModelOptions
    shard: Shard
    runner: object  # node.pipeline.Pipeline, built but not installed


def fits_beside(current: Shard | None, ours: pb.PlanShard, budget: int) -> bool:
    """Whether the budget holds the shard this node serves and its share of the new plan
    (the planner's estimate: weights and KV cache) at the same time."""
    held = current.weight_bytes if current is not None else 0
    return held + ours.param_bytes + ours.kv_bytes <= budget


def same_shard(current: Shard | None, source: ModelSource, ours: pb.PlanShard) -> bool:
    """The new plan gives this node the layers it already holds, of the same model."""
    return current is not None and current.source == source and (
        current.start, current.end) == (ours.start_layer, ours.end_layer)


async def load_beside(executor: Executor, source: ModelSource, start: int, end: int) -> Shard:
    """Load a shard one step at a time on the MLX thread (`executor`, one thread), leaving
    room for the serving plan's forwards between steps."""
    loop = asyncio.get_running_loop()
    steps = load_steps(source, start, end)
    while (shard := await loop.run_in_executor(executor, next, steps)) is None:
        pass
    return shard
