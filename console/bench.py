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
"""

from __future__ import annotations

import asyncio
import random
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from console.client import ClusterError, NodeClient, gather_infos, to_dict
from protos import cluster_pb2 as pb

SCHEMA = "mlx-cluster-bench/1"
PERCENTILES = (50, 90, 95, 99)


@dataclass
class Workload:
    model: str
    prompt_tokens: int = 64
    gen_tokens: int = 32
    requests: int = 8
    concurrency: list[int] = field(default_factory=lambda: [1])
    warmup: int = 1
    repeats: int = 1
    strategy: str = "memory"
    seed: int = 0
    timeout_s: float = 120.0
    backends: list[str] = field(default_factory=lambda: ["pipeline"])


@dataclass
class RequestResult:
    ok: bool
    ttft_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    e2e_s: float = 0.0
    tokens: int = 0
    token_ids: list[int] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)  # monotonic arrival of each token
    failure: str = ""  # timeout | network | memory | other
    error: str = ""


def percentiles(values: list[float]) -> dict[str, float]:
    """p50/p90/p95/p99 (nearest rank), mean and max; zeros when empty."""
    if not values:
        return {**{f"p{q}": 0.0 for q in PERCENTILES}, "mean": 0.0, "max": 0.0, "n": 0}
    ordered = sorted(values)
    out = {f"p{q}": ordered[min(len(ordered) - 1, max(0, -(-q * len(ordered) // 100) - 1))]
           for q in PERCENTILES}
    return {**out, "mean": statistics.fmean(ordered), "max": ordered[-1], "n": len(ordered)}


def failure_kind(error: Exception) -> str:
    text = str(error)
    if "DEADLINE_EXCEEDED" in text or "timed out" in text or isinstance(error, TimeoutError):
        return "timeout"
    if "UNAVAILABLE" in text or "unreachable" in text:
        return "network"
    if "RESOURCE_EXHAUSTED" in text or "memory" in text.lower():
        return "memory"
    return "other"


def prompt_ids(vocab: int, n: int, seed: int, avoid: set[int]) -> list[int]:
    """n token ids from the ordinary vocabulary (no special/control ids), seeded."""
    rng = random.Random(seed)
    low = 300 if vocab > 1000 else 32  # skip control tokens / byte controls
    high = min(vocab, 256) if vocab < 1000 else vocab
    out = []
    while len(out) < n:
        t = rng.randrange(low, high)
        if t not in avoid:
            out.append(t)
    return out


def workload_prompts(model: str, count: int, tokens: int, seed: int) -> list[list[int]]:
    """`count` seeded prompts of exactly `tokens` ids from the model's vocabulary."""
    from node.models import resolve
    from node.tokenizers import prompt_tokenizer

    source = resolve(model)
    avoid = set(prompt_tokenizer(source).eos_ids)
    vocab = int(source.config["vocab_size"])
    return [prompt_ids(vocab, tokens, seed + i, avoid) for i in range(count)]


async def one_request(client: NodeClient, ids: list[int], gen: int,
                      timeout_s: float) -> RequestResult:
    request = pb.GenerateRequest(prompt_ids=ids, max_tokens=gen, ignore_eos=True,
                                 timeout_s=timeout_s)
    t0 = time.perf_counter()
    result = RequestResult(ok=False)
    try:
        async with asyncio.timeout(timeout_s + 30):
            async for event in client.generate(request):
                if event.HasField("token"):
                    result.token_ids.append(event.token.token_id)
                    result.token_times.append(time.monotonic())
                    if len(result.token_ids) == 1:
                        result.ttft_s = time.perf_counter() - t0
                    else:
                        result.itl_s.append(event.token.latency_s)
    except (ClusterError, TimeoutError) as e:
        result.failure, result.error = failure_kind(e), str(e)[:300]
        result.e2e_s = time.perf_counter() - t0
        result.tokens = len(result.token_ids)
        return result
    result.e2e_s = time.perf_counter() - t0
    result.tokens = len(result.token_ids)
    result.ok = result.tokens == gen
    if not result.ok:
        result.failure, result.error = "other", f"{result.tokens} of {gen} tokens"
    return result


async def run_level(entry: NodeClient, prompts: list[list[int]], gen: int, concurrency: int,
                    timeout_s: float, progress) -> tuple[list[RequestResult], float]:
    """All requests released together, at most `concurrency` in flight."""
    gate = asyncio.Semaphore(concurrency)
    done = 0

    async def guarded(ids: list[int]) -> RequestResult:
        nonlocal done
        async with gate:
            r = await one_request(entry, ids, gen, timeout_s)
        done += 1
        progress(done, len(prompts))
        return r

    t0 = time.perf_counter()
    results = await asyncio.gather(*(guarded(p) for p in prompts))
    return list(results), time.perf_counter() - t0


def summarise(results: list[RequestResult], wall_s: float, concurrency: int) -> dict:
    ok = [r for r in results if r.ok]
    failures: dict[str, int] = {}
    for r in results:
        if not r.ok:
            failures[r.failure] = failures.get(r.failure, 0) + 1
    tokens = sum(r.tokens for r in results)
    tpot = [statistics.fmean(r.itl_s) for r in ok if r.itl_s]
    single = [(r.tokens - 1) / sum(r.itl_s) for r in ok if r.itl_s and sum(r.itl_s) > 0]
    return {
        "concurrency": concurrency, "requests": len(results), "succeeded": len(ok),
        "success_rate": len(ok) / len(results) if results else 0.0, "failures": failures,
        "wall_s": wall_s, "output_tokens": tokens,
        "aggregate_tokens_per_s": tokens / wall_s if wall_s > 0 else 0.0,
        "single_stream_tokens_per_s": statistics.fmean(single) if single else 0.0,
        "ttft_s": percentiles([r.ttft_s for r in ok]),
        "tpot_s": percentiles(tpot),
        "itl_s": percentiles([x for r in ok for x in r.itl_s]),
        "itl_samples": [round(x, 6) for r in ok for x in r.itl_s][:20000],  # for CDFs
        "e2e_s": percentiles([r.e2e_s for r in ok]),
    }


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
                    "latencies": lat})
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


async def bench_cluster(addresses: list[str], work: Workload, progress=None,
                        client_options: dict | None = None, backend: str = "pipeline") -> dict:
    """Load the model on these nodes with `backend` and run the workload; one entry per
    concurrency."""
    from console.cli import load_plan

    progress = progress or (lambda *a: None)
    clients = [NodeClient(a, **(client_options or {})) for a in addresses]
    try:
        plan, shards = await load_plan(clients, work.model, "", 0, work.strategy,
                                       progress=lambda m: None, backend=backend)
        after_load = await node_state(clients)
        entry = next(c for c in clients if c.address == plan.shards[0].address)
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
    finally:
        await asyncio.gather(*(c.close() for c in clients))


def progress_bar(label: str, done: int, total: int) -> None:
    width = 30
    filled = round(width * done / total) if total else width
    print(f"\r{label:28} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}",
          end="" if done < total else "\n", file=sys.stderr, flush=True)


def run_bench(work: Workload, addresses: list[str] | None, nodes_sweep: list[int] | None,
              local: bool, client_options: dict | None = None, scenario: str = "",
              fault_at: float = 0.3) -> dict:
    """The whole benchmark document (schema mlx-cluster-bench/1)."""
    from console import local as local_cluster

    configs, scenarios = [], []
    if scenario:
        n = (nodes_sweep or [3])[-1]
        concurrency = work.concurrency[-1]
        if local:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "cluster.json"
                print(f"starting a {n}-node local cluster (faults allowed) ...",
                      file=sys.stderr)
                cluster = local_cluster.up(n, path=path,
                                           node_args=["--no-advertise", "--allow-faults"])
                try:
                    addrs = [x["address"] for x in cluster["nodes"]]
                    scenarios.append(asyncio.run(run_scenario(
                        addrs, work, scenario, concurrency, fault_at, progress_bar,
                        client_options)))
                finally:
                    local_cluster.down(path)
        else:
            if not addresses:
                raise ClusterError("no nodes to benchmark")
            scenarios.append(asyncio.run(run_scenario(addresses, work, scenario, concurrency,
                                                      fault_at, progress_bar, client_options)))
    elif nodes_sweep:
        if not local and addresses and max(nodes_sweep) > len(addresses):
            raise ClusterError(f"--nodes-sweep asks for {max(nodes_sweep)} nodes but only "
                               f"{len(addresses)} are named; add --local to start them")
        for n in nodes_sweep:
            if local:
                with tempfile.TemporaryDirectory() as tmp:
                    path = Path(tmp) / "cluster.json"
                    print(f"starting a {n}-node local cluster ...", file=sys.stderr)
                    cluster = local_cluster.up(n, path=path, node_args=["--no-advertise"])
                    try:
                        addrs = [x["address"] for x in cluster["nodes"]]
                        configs.extend(every_backend(addrs, work, client_options))
                    finally:
                        local_cluster.down(path)
            else:
                configs.extend(every_backend(addresses[:n], work, client_options))
    else:
        if not addresses:
            raise ClusterError("no nodes to benchmark")
        configs.extend(every_backend(addresses, work, client_options))
    from node import __version__

    return {"schema": SCHEMA, "created_unix": time.time(), "tool_version": __version__,
            "backend": ",".join(work.backends), "workload": asdict(work),
            "configurations": configs,
            "scenarios": scenarios}


def every_backend(addresses: list[str], work: Workload,
                  client_options: dict | None) -> list[dict]:
    """The same workload on the same nodes with each backend in turn."""
    return [asyncio.run(bench_cluster(addresses, work, progress_bar, client_options, b))
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


# ------------------------------------------------------------------ fault scenarios

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
                       client_options: dict | None = None) -> dict:
    """Run `work.requests` requests at `concurrency`, inject `fault` into a non-entry node
    once `fault_at` of them are done, and compare every output with a fault-free run."""
    from console.cli import load_plan

    progress = progress or (lambda *a: None)
    clients = [NodeClient(a, **(client_options or {})) for a in addresses]
    backend = work.backends[0]
    try:  # an mlx-ring group re-forms on the survivors (MLX's groups cannot lose a rank)
        plan, _ = await load_plan(clients, work.model, "", 0, work.strategy,
                                  progress=lambda m: None, backend=backend,
                                  auto_reform=True)
        entry = next(c for c in clients if c.address == plan.shards[0].address)
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
    finally:
        await asyncio.gather(*(c.close() for c in clients))
