"""Fault scenarios for `mlx-cluster bench --scenario`: a fault injected mid-run into the
node at a chosen position of the plan (the entry node, a middle one or the last), with
success, the longest stall, recovery times and every output compared with a fault-free
run of the same prompts. Requests survive the entry node's loss (console.workload.Route).
"""

from __future__ import annotations

import asyncio
import time

from console import ops
from console.client import ClusterError, NodeClient, gather_infos, to_dict
from console.workload import (
    RequestResult,
    Route,
    Workload,
    one_request,
    summarise,
    workload_prompts,
)
from protos import cluster_pb2 as pb

SCENARIOS = {
    "kill": pb.FaultSpec(kind="kill"),
    "partition": pb.FaultSpec(kind="partition", direction="both"),
    "latency": pb.FaultSpec(kind="latency", ms=50, jitter_ms=10, seed=1),
    "loss": pb.FaultSpec(kind="loss", p=0.05, seed=1),
    "memory": pb.FaultSpec(kind="memory-pressure", gib=0.5),
}
POSITIONS = ("entry", "middle", "last")  # where in the plan the faulty node sits
UNIQUE_PROMPTS = 8  # requests cycle over these, so a fault-free reference stays cheap


def check_positions(positions: list[str], nodes: int | None = None) -> None:
    """Refuse unknown positions, and (when the node count is known) ones the plan lacks."""
    bad = [p for p in positions if p not in POSITIONS]
    if bad or not positions:
        raise ClusterError(f"unknown node position {', '.join(bad) or '(none)'}: --node takes "
                           f"{', '.join(POSITIONS)} (comma-separated for several)")
    if nodes is not None and nodes < 2:
        raise ClusterError(f"a fault scenario needs 2 or more nodes (here {nodes}): the "
                           "survivors carry on; use --nodes-sweep 3 with --local")
    if nodes is not None and nodes < 3 and "middle" in positions:
        raise ClusterError(f"--node middle needs 3 or more nodes (here {nodes}); use "
                           "--nodes-sweep 3 with --local, or --node entry or last")


def victim_of(plan: pb.Plan, position: str) -> pb.PlanShard:
    """The plan's shard at `position`: entry is the first (where requests enter: layer 0,
    rank 0), last the last, middle the one halfway between."""
    check_positions([position], len(plan.shards))
    index = {"entry": 0, "middle": len(plan.shards) // 2, "last": -1}[position]
    return plan.shards[index]


async def recoveries_since(clients: list[NodeClient], epoch: int) -> list[pb.Recovery]:
    """The re-plans away from `epoch` or later that the nodes still up report, once each
    (the coordinator records one; a takeover's new coordinator may be another node)."""
    found: dict[tuple[int, tuple[str, ...]], pb.Recovery] = {}
    for info in await gather_infos(clients):
        if isinstance(info, ClusterError):
            continue  # the node the fault took down
        for r in info.recoveries:
            if r.from_epoch >= epoch:
                found.setdefault((r.to_epoch, tuple(sorted(r.lost))), r)
    return [found[k] for k in sorted(found)]


async def run_scenario(addresses: list[str], work: Workload, fault: str, concurrency: int,
                       fault_at: float = 0.3, progress=None,
                       connection: ops.Connection | None = None,
                       position: str = "last") -> dict:
    """Run `work.requests` requests at `concurrency`, inject `fault` into the node at
    `position` once `fault_at` of them are done, and compare every output with a
    fault-free run."""
    progress = progress or (lambda *a: None)
    backend = work.backends[0]
    async with ops.connect(addresses, connection) as clients:
        # an mlx-ring group re-forms on the survivors (MLX's groups cannot lose a rank)
        plan, _ = await ops.load_plan(clients, work.model, "", 0, work.strategy,
                                      progress=lambda m: None, backend=backend,
                                      auto_reform=True)
        victim_shard = victim_of(plan, position)
        victim = next(c for c in clients if c.address == victim_shard.address)
        route = Route(clients)
        pool = workload_prompts(work.model, UNIQUE_PROMPTS, work.prompt_tokens, work.seed)
        reference = []
        for p in pool:
            r = await one_request(route, p, work.gen_tokens, work.timeout_s)
            if not r.ok:
                raise ClusterError(f"the fault-free reference run failed: {r.error}")
            reference.append(r.token_ids)

        spec = pb.FaultSpec()
        spec.CopyFrom(SCENARIOS[fault])
        if fault == "partition":  # cut off from the entry node (or, for it, the next)
            first = plan.shards[0]
            peer = plan.shards[1] if victim_shard.node_id == first.node_id else first
            spec.peers.extend([peer.node_id, peer.address])
        gate = asyncio.Semaphore(concurrency)
        done = 0
        injected_at: list[float] = []
        label = f"{fault} {position} c={concurrency}"

        async def guarded(i: int) -> RequestResult:
            nonlocal done
            async with gate:
                r = await one_request(route, pool[i % len(pool)], work.gen_tokens,
                                      work.timeout_s)
            done += 1
            progress(label, done, work.requests)
            if not injected_at and done >= fault_at * work.requests:
                injected_at.append(time.monotonic())
                try:
                    await victim.inject(spec)
                except ClusterError:
                    if fault != "kill":  # a kill may take the answer down with it
                        raise
            return r

        t0 = time.perf_counter()
        results = await asyncio.gather(*(guarded(i) for i in range(work.requests)))
        wall = time.perf_counter() - t0
        if fault != "kill":
            await victim.heal()
        new = await recoveries_since(clients, plan.epoch)
    return scenario_result(fault, position, backend, victim_shard, work, concurrency,
                           list(results), reference, injected_at, new, wall)


def scenario_result(fault: str, position: str, backend: str, victim: pb.PlanShard,
                    work: Workload, concurrency: int, results: list[RequestResult],
                    reference: list[list[int]], injected_at: list[float],
                    new: list[pb.Recovery], wall: float) -> dict:
    """One scenario's row of the result document."""
    correct = [r.ok and r.token_ids == reference[i % len(reference)]
               for i, r in enumerate(results)]
    t_fault = injected_at[0] if injected_at else 0.0
    later = sorted(t for r in results for t in r.token_times if t > t_fault)
    gaps = [b - a for a, b in zip([t_fault, *later], later)] if injected_at else []
    summary = summarise(results, wall, concurrency)
    first = new[0] if new and not new[0].error else None  # None: nothing was measured
    return {
        "fault": fault, "position": position, "backend": backend,
        "node": victim.name or victim.address,
        "requests": work.requests, "concurrency": concurrency,
        "succeeded": summary["succeeded"],
        "success_rate": summary["success_rate"], "failures": summary["failures"],
        "outputs_correct": all(c for c, r in zip(correct, results) if r.ok),
        "correct_outputs": sum(correct),
        # the longest wait between two tokens of one request, as its client saw it
        "max_gap_s": max((r.max_gap_s for r in results), default=0.0),
        # the longest time after the fault in which no request received a token
        "stall_s": max(gaps) if gaps else None,
        # requests continued on a new entry node by their client, or replayed on the new
        # plan by a surviving entry node
        "resumed": max(sum(r.resumed for r in results),
                       sum(r.resumed_requests for r in new)),
        "injected": bool(injected_at),
        "recoveries": [to_dict(r) for r in new],
        "detect_s": first.detect_s if first else None,
        "recover_s": first.detect_s + first.replan_s + first.reload_s if first else None,
        # (0: no resumed request gave a token after the recovery, e.g. those lost before
        # their first token were simply sent again)
        "first_token_s": first.first_token_s or None if first else None,
        "recovery_error": new[0].error if new else "",
        "aggregate_tokens_per_s": summary["aggregate_tokens_per_s"],
        "errors": [r.error for r in results if not r.ok][:10],
    }
