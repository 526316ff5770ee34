"""Fault scenarios for `mlx-cluster bench --scenario`: a fault injected into a non-entry
node mid-run, with success, recovery times and every output compared with a fault-free
run of the same prompts.
"""

from __future__ import annotations

import asyncio
import time

from console import ops
from console.client import ClusterError, to_dict
from console.workload import RequestResult, Workload, one_request, summarise, workload_prompts
from protos import cluster_pb2 as pb

SCENARIOS = {
    "kill": pb.FaultSpec(kind="kill"),
    "partition": pb.FaultSpec(kind="partition", direction="both"),
    "latency": pb.FaultSpec(kind="latency", ms=50, jitter_ms=10, seed=1),
    "loss": pb.FaultSpec(kind="loss", p=0.05, seed=1),
    "memory": pb.FaultSpec(kind="memory-pressure", gib=0.5),
}
UNIQUE_PROMPTS = 8  # requests cycle over these, so a fault-free reference stays cheap


async def run_scenario(addresses: list[str], work: Workload, fault: str, concurrency: int,
                       fault_at: float = 0.3, progress=None,
                       connection: ops.Connection | None = None) -> dict:
    """Run `work.requests` requests at `concurrency`, inject `fault` into a non-entry node
    once `fault_at` of them are done, and compare every output with a fault-free run."""
    progress = progress or (lambda *a: None)
    backend = work.backends[0]
    async with ops.connect(addresses, connection) as clients:
        # an mlx-ring group re-forms on the survivors (MLX's groups cannot lose a rank)
        plan, _ = await ops.load_plan(clients, work.model, "", 0, work.strategy,
                                      progress=lambda m: None, backend=backend,
                                      auto_reform=True)
        entry, _ = await ops.entry_client(clients)
        victim_shard = plan.shards[-1]
        victim = next(c for c in clients if c.address == victim_shard.address)
        pool = workload_prompts(work.model, UNIQUE_PROMPTS, work.prompt_tokens, work.seed)
        reference = [(await one_request(entry, p, work.gen_tokens, work.timeout_s)).token_ids
                     for p in pool]
        before = list((await entry.info()).recoveries)

        spec = pb.FaultSpec()
        spec.CopyFrom(SCENARIOS[fault])
        if fault == "partition":
            spec.peers.extend([plan.shards[0].node_id, plan.shards[0].address])
        gate = asyncio.Semaphore(concurrency)
        done = 0
        injected_at: list[float] = []

        async def guarded(i: int) -> RequestResult:
            nonlocal done
            async with gate:
                r = await one_request(entry, pool[i % len(pool)], work.gen_tokens,
                                      work.timeout_s)
            done += 1
            progress(f"{fault} c={concurrency}", done, work.requests)
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
        after = list((await entry.info()).recoveries)
        new = after[len(before):]
        correct = [r.ok and r.token_ids == reference[i % len(pool)]
                   for i, r in enumerate(results)]
        t_fault = injected_at[0] if injected_at else 0.0
        later = sorted(t for r in results for t in r.token_times if t > t_fault)
        gaps = [b - a for a, b in zip([t_fault, *later], later)] if injected_at else []
        summary = summarise(list(results), wall, concurrency)
        return {
            "fault": fault, "backend": backend,
            "node": victim_shard.name or victim_shard.address,
            "requests": work.requests, "concurrency": concurrency,
            "success_rate": summary["success_rate"], "failures": summary["failures"],
            "outputs_correct": all(c for c, r in zip(correct, results) if r.ok),
            "correct_outputs": sum(correct),
            "stall_s": max(gaps) if gaps else None,
            "injected": bool(injected_at),
            "recoveries": [to_dict(r) for r in new],
            # None where nothing was measured (no recovery happened, or it failed)
            "detect_s": new[0].detect_s if new and not new[0].error else None,
            "recover_s": (new[0].detect_s + new[0].replan_s + new[0].reload_s)
            if new and not new[0].error else None,
            "first_token_s": new[0].first_token_s if new and not new[0].error else None,
            "recovery_error": new[0].error if new else "",
            "aggregate_tokens_per_s": summary["aggregate_tokens_per_s"],
            "errors": [r.error for r in results if not r.ok][:10],
        }
