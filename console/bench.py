"""`mlx-cluster bench`: measure a cluster the way serious serving benchmarks do.

A workload is exact: prompts of a given number of token ids (seeded, drawn from the
model's ordinary vocabulary), a fixed generation length with EOS ignored, a number of
requests, and a concurrency sweep in which each level's requests are released together
with at most `c` in flight. Warm-up requests run first and are not recorded. Per run it
records TTFT, TPOT (per request), inter-token latency and end-to-end latency at
p50/p90/p95/p99, single-stream and aggregate output tokens/s, success rate with failures
by kind, memory per node (after load, peak, steady), bytes on the wire per generated
token per hop, per-hop compute vs transfer time, and the environment. `--nodes-sweep`
repeats the workload on clusters of growing size (started and stopped by the runner with
`--local`). Results are one versioned JSON document; `mlx-cluster report` renders it.
The workload and its measurement are in console/workload.py, fault scenarios in
console/scenarios.py.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from console import ops
from console.client import ClusterError, NodeClient, gather_infos, to_dict
from console.ops import Connection
from console.scenarios import check_positions, run_scenario
from console.workload import (
    PERCENTILES,
    Route,
    Workload,
    one_request,
    run_level,
    summarise,
    workload_prompts,
)
from node.plan import stage_seconds

SCHEMA = "mlx-cluster-bench/1"


async def node_state(clients: list[NodeClient]) -> list[dict]:
    infos = await gather_infos(clients)
    metrics = await asyncio.gather(*(c.metrics() for c in clients), return_exceptions=True)
    out = []
    for c, info, m in zip(clients, infos, metrics):
        if isinstance(info, ClusterError) or isinstance(m, BaseException):
            out.append({"address": c.address, "error": str(info if isinstance(
                info, ClusterError) else m)})
            continue
        lat = {s.name: {"p50_s": s.p50_s, "p99_s": s.p99_s, "count": s.count}
               for s in m.latencies}
        out.append({"address": c.address, "node_id": info.node_id, "name": info.name,
                    "mlx_active_bytes": info.mlx_active_bytes,
                    "mlx_peak_bytes": info.mlx_peak_bytes, "rss_bytes": info.rss_bytes,
                    "bytes_out": m.bytes_out, "bytes_in": m.bytes_in,
                    "frames_out": m.frames_out, "tokens_generated": m.tokens_generated,
                    "forwards": {k: m.counters.get(k, 0)
                                 for k in ("forward_steps", "forward_rows", "forward_us")},
                    "matmul_gflops": info.capabilities.matmul_gflops, "latencies": lat})
    return out


def communication(before: list[dict], after: list[dict], tokens: int, hops: int,
                  backend: str = "pipeline") -> dict:
    """Bytes on the wire per generated token per hop, and the compute/transfer split.
    mlx-ring traffic moves inside MLX's own sockets, which the node services do not see:
    those figures are None (not measured), never a made-up zero."""
    if backend.startswith("mlx-ring"):
        step = [a["latencies"].get("step_compute", {}).get("p50_s", 0.0) for a in after
                if "latencies" in a]
        return {"hops_per_token": hops, "bytes_per_token_per_hop": None,
                "step_compute_p50_s": step, "hop_p50_s": None, "compute_s_per_token": None,
                "transfer_s_per_token": None}
    sent = sum(a.get("bytes_out", 0) - b.get("bytes_out", 0) for b, a in zip(before, after))
    step = [a["latencies"].get("step_compute", {}).get("p50_s", 0.0) for a in after
            if "latencies" in a]
    hop = [a["latencies"].get("hop", {}).get("p50_s", 0.0) for a in after
           if "latencies" in a and "hop" in a["latencies"]]
    return {
        "hops_per_token": hops,
        "bytes_per_token_per_hop": sent / tokens / hops if tokens and hops else 0.0,
        "step_compute_p50_s": step,
        "hop_p50_s": statistics.fmean(hop) if hop else 0.0,
        "compute_s_per_token": sum(step),
        "transfer_s_per_token": (statistics.fmean(hop) if hop else 0.0) * hops,
    }


def stage_times(before: list[dict], after: list[dict], plan) -> list[dict]:
    """Each stage's forwards during a run: how many, their mean rows and measured time,
    beside the plan's prediction for those rows (None where the node is not calibrated).
    The slowest stage sets the pace of micro-batches in flight."""
    macs = {s.node_id: s.macs_per_token for s in plan.shards}
    out = []
    for b, a in zip(before, after):
        if "forwards" not in a or "forwards" not in b:
            continue
        d = {k: a["forwards"][k] - b["forwards"][k] for k in a["forwards"]}
        steps = d["forward_steps"]
        rows = d["forward_rows"] / steps if steps else 0.0
        out.append({"node": a.get("name") or a["address"], "forwards": steps,
                    "rows_per_forward": rows,
                    "measured_step_s": d["forward_us"] / 1e6 / steps if steps else None,
                    "predicted_step_s": stage_seconds(macs.get(a.get("node_id"), 0), rows,
                                                      a.get("matmul_gflops", 0.0)) or None})
    return out


async def bench_cluster(addresses: list[str], work: Workload, progress=None,
                        connection: Connection | None = None,
                        backend: str = "pipeline") -> dict:
    """Load the model on these nodes with `backend` and run the workload; one entry per
    concurrency."""
    progress = progress or (lambda *a: None)
    async with ops.connect(addresses, connection) as clients:
        plan, shards = await ops.load_plan(clients, work.model, "", 0, work.strategy,
                                           progress=lambda m: None, backend=backend,
                                           microbatches=work.microbatches)
        after_load = await node_state(clients)
        entry = Route(clients)
        prompts = workload_prompts(work.model, work.requests, work.prompt_tokens, work.seed)
        for i in range(work.warmup):
            await one_request(entry, prompts[i % len(prompts)], work.gen_tokens, work.timeout_s)
        runs = []
        for c in work.concurrency:
            for rep in range(work.repeats):
                before = await node_state(clients)
                results, wall = await run_level(
                    entry, prompts, work.gen_tokens, c, work.timeout_s,
                    lambda d, n, c=c, rep=rep: progress(f"{backend} {len(addresses)}n c={c} "
                                                        f"#{rep + 1}", d, n))
                after = await node_state(clients)
                summary = summarise(results, wall, c)
                summary["repeat"] = rep
                summary["communication"] = communication(
                    before, after, summary["output_tokens"], len(addresses), backend)
                summary["stages"] = stage_times(before, after, plan)
                summary["outputs"] = [r.token_ids for r in results]
                summary["errors"] = [r.error for r in results if not r.ok][:10]
                runs.append(summary)
        steady = await node_state(clients)
        memory = [{"address": a["address"], "name": a.get("name", ""),
                   "after_load_bytes": a.get("mlx_active_bytes", 0),
                   "peak_bytes": s.get("mlx_peak_bytes", 0),
                   "steady_bytes": s.get("mlx_active_bytes", 0),
                   "rss_bytes": s.get("rss_bytes", 0)} for a, s in zip(after_load, steady)]
        infos = [i for i in await gather_infos(clients) if not isinstance(i, ClusterError)]
        return {"nodes": len(addresses), "backend": backend, "plan": to_dict(plan),
                "environment": [to_dict(i.capabilities) | {"name": i.name,
                                                           "address": i.address,
                                                           "version": i.version}
                                for i in infos],
                "memory": memory, "runs": runs}


def progress_bar(label: str, done: int, total: int) -> None:
    width = 30
    filled = round(width * done / total) if total else width
    print(f"\r{label:28} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}",
          end="" if done < total else "\n", file=sys.stderr, flush=True)


def run_bench(work: Workload, addresses: list[str] | None, nodes_sweep: list[int] | None,
              local: bool, connection: Connection | None = None, scenario: str = "",
              fault_at: float = 0.3, positions: list[str] | None = None) -> dict:
    """The whole benchmark document (schema mlx-cluster-bench/1). A scenario runs once
    per node position (`positions`: entry, middle, last; default last)."""
    from console import local as local_cluster

    configs, scenarios = [], []
    if scenario:
        scenarios = scenario_runs(work, addresses, nodes_sweep, local, connection, scenario,
                                  fault_at, positions or ["last"])
    elif nodes_sweep:
        if not local and addresses and max(nodes_sweep) > len(addresses):
            raise ClusterError(f"--nodes-sweep asks for {max(nodes_sweep)} nodes but only "
                               f"{len(addresses)} are named; add --local to start them")
        for n in nodes_sweep:
            if local:
                with tempfile.TemporaryDirectory() as tmp:
                    path = Path(tmp) / "cluster.json"
                    print(f"starting a {n}-node local cluster ...", file=sys.stderr)
                    # not calibrated: the nodes share one host's cores, and a calibration
                    # beside other work on the host would split the layers by that noise
                    cluster = local_cluster.up(n, path=path, node_args=["--no-advertise"],
                                               cpus_per_node=work.cpus_per_node,
                                               oversubscribe=work.oversubscribe)
                    try:
                        addrs = [x["address"] for x in cluster["nodes"]]
                        configs.extend(every_backend(addrs, work, connection))
                    finally:
                        local_cluster.down(path)
            else:
                configs.extend(every_backend(addresses[:n], work, connection))
    else:
        if not addresses:
            raise ClusterError("no nodes to benchmark")
        configs.extend(every_backend(addresses, work, connection))
    from node import __version__

    return {"schema": SCHEMA, "created_unix": time.time(), "tool_version": __version__,
            "backend": ",".join(work.backends), "workload": asdict(work),
            "configurations": configs,
            "scenarios": scenarios}


def scenario_runs(work: Workload, addresses: list[str] | None, nodes_sweep: list[int] | None,
                  local: bool, connection: Connection | None, scenario: str, fault_at: float,
                  positions: list[str]) -> list[dict]:
    """`scenario` once per position, each on a fresh local cluster with --local (a kill
    leaves a node dead), else on the named nodes."""
    from console import local as local_cluster

    if not local and not addresses:
        raise ClusterError("no nodes to benchmark")
    n = (nodes_sweep or [3])[-1] if local else len(addresses)
    check_positions(positions, n)
    if not local and scenario == "kill" and len(positions) > 1:
        raise ClusterError("a kill leaves its node dead, so each position needs a fresh "
                           "cluster: add --local, or name one --node")
    concurrency = work.concurrency[-1]
    out = []
    for position in positions:
        if not local:
            out.append(asyncio.run(run_scenario(addresses, work, scenario, concurrency,
                                                fault_at, progress_bar, connection,
                                                position)))
            continue
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "cluster.json"
            print(f"starting a {n}-node local cluster (faults allowed) ...", file=sys.stderr)
            cluster = local_cluster.up(n, path=path,
                                       node_args=["--no-advertise", "--allow-faults"])
            try:
                addrs = [x["address"] for x in cluster["nodes"]]
                out.append(asyncio.run(run_scenario(addrs, work, scenario, concurrency,
                                                    fault_at, progress_bar, connection,
                                                    position)))
            finally:
                local_cluster.down(path)
    return out


def every_backend(addresses: list[str], work: Workload,
                  connection: Connection | None) -> list[dict]:
    """The same workload on the same nodes with each backend in turn."""
    return [asyncio.run(bench_cluster(addresses, work, progress_bar, connection, b))
            for b in work.backends]


RUN_KEYS = {"concurrency": int, "requests": int, "succeeded": int, "success_rate": float,
            "failures": dict, "wall_s": float, "output_tokens": int,
            "aggregate_tokens_per_s": float, "single_stream_tokens_per_s": float,
            "ttft_s": dict, "tpot_s": dict, "itl_s": dict, "e2e_s": dict,
            "communication": dict, "outputs": list}


def validate_results(doc: dict) -> list[str]:
    """Problems with a result document (empty when it matches schema mlx-cluster-bench/1)."""
    problems = []
    if doc.get("schema") != SCHEMA:
        problems.append(f"schema is {doc.get('schema')!r}, expected {SCHEMA!r}")
    for key in ("workload", "configurations", "backend", "created_unix"):
        if key not in doc:
            problems.append(f"missing {key}")
    for i, config in enumerate(doc.get("configurations", [])):
        for key in ("nodes", "plan", "environment", "memory", "runs"):
            if key not in config:
                problems.append(f"configurations[{i}] missing {key}")
        for j, run in enumerate(config.get("runs", [])):
            for key, kind in RUN_KEYS.items():
                value = run.get(key)
                if not isinstance(value, kind) and not (kind is float and
                                                         isinstance(value, int)):
                    problems.append(f"configurations[{i}].runs[{j}].{key} is not "
                                    f"{kind.__name__}")
            for metric in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
                for q in PERCENTILES:
                    if not isinstance(run.get(metric, {}).get(f"p{q}"), int | float):
                        problems.append(f"configurations[{i}].runs[{j}].{metric}.p{q} missing")
    return problems
