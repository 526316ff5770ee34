"""How `mlx-cluster` shows results as text (without --json): node status lines, nodes
found by discovery, the plan table and the benchmark summary. Each takes the data the
command also prints as JSON.
"""

from __future__ import annotations

from console.ops import STEP_ROWS, plan_rows
from node.plan import GIB, backend_label
from protos import cluster_pb2 as pb


def status_text(rows: list[dict]) -> str:
    """One line per node of `mlx-cluster status --json`'s rows."""
    lines = []
    for r in rows:
        if "error" in r:
            lines.append(f"{r['address']:22} DOWN  {r['error']}")
            continue
        caps, shard = r["capabilities"], r.get("shard") or {}
        mem = (f"mlx {r['mlx_active_bytes'] / GIB:5.2f} GiB (rss {r['rss_bytes'] / GIB:.2f}) / "
               f"budget {caps['memory_budget'] / GIB:5.2f} GiB")
        layers = (f"{shard['model']} {shard['start_layer']}-{shard['end_layer']} "
                  f"(epoch {shard['epoch']})") if shard else "no shard"
        ring = shard.get("ring")
        if ring:  # an mlx-ring rank: its worker's state (and why it is down)
            layers += (f" · mlx-ring:{ring['parallel']} rank {ring.get('rank', 0)}/"
                       f"{ring['size']} {ring['state']}"
                       + (f": {ring['error']}" if ring.get("error") else ""))
        cache = shard.get("prompt_cache")
        if cache and cache["max_bytes"]:  # the pipeline's prefix cache on this shard
            layers += (f" · prefix cache {cache['bytes'] / 2**20:.1f} of "
                       f"{cache['max_bytes'] / 2**20:.1f} MiB, {cache['entries']} prompt(s), "
                       f"hits {cache['hits']}/{cache['lookups']}")
        faults = ", ".join(f"{f['spec']['kind']} ({f['id']})" for f in r.get("faults", []))
        lines.append(f"{r['address']:22} {'up' if r['up'] else 'unhealthy':5} {r['name'][:10]:10} "
                     f"{caps['mlx_device']}/{caps['blas']:9} {mem}  {layers}"
                     + (f"  faults: {faults}" if faults else "")
                     + ("  OPEN: no token off loopback (--insecure)" if r.get("insecure")
                        else ""))
    return "\n".join(lines)


def found_text(found: list[pb.NodeInfo]) -> str:
    """One line per node that discovery found."""
    return "\n".join(
        f"{i.name[:16]:16} {i.address:22} id {i.node_id}  {i.capabilities.mlx_device}/"
        f"{i.capabilities.blas}  budget {i.capabilities.memory_budget / GIB:.1f} GiB"
        + (f"  {i.shard.model} {i.shard.start_layer}-{i.shard.end_layer}"
           if i.HasField("shard") else "") for i in found)


def plan_table(plan: pb.Plan, budgets: dict[str, int], dtype: str,
               speeds: dict[str, float] | None = None) -> str:
    """The plan as `mlx-cluster plan` prints it: a header line, a row per node, and what
    WORK and STEP mean. `speeds`: node id -> calibrated GFLOP/s, for predicted times."""
    split = (f" · every layer split {len(plan.shards)} ways"
             if plan.backend == "mlx-ring" and plan.parallel == "tensor" else "")
    lines = [f"{plan.model} · {plan.n_layers} layers · {dtype} · "
             f"{backend_label(plan.backend, plan.parallel)}{split} · strategy {plan.strategy} · "
             f"KV cache at {plan.context_length} tokens",
             f"{'NODE':12} {'ADDRESS':21} {'LAYERS':>7}  {'LAYER MAP':30}  "
             f"{'WEIGHTS':>9} {'KV':>9} {'TOTAL':>9} {'BUDGET':>9} {'WORK':>5} "
             f"{'STEP':>8}"]
    rows = plan_rows(plan, speeds)
    for r in rows:
        step = r["predicted_step_s"]
        lines.append(f"{r['name'][:12]:12} {r['address']:21} "
                     f"{r['start_layer']:>3}-{r['end_layer']:<3}  {r['bar']:30}  "
                     f"{r['param_bytes'] / GIB:5.2f} GiB {r['kv_bytes'] / GIB:5.2f} GiB "
                     f"{r['total_bytes'] / GIB:5.2f} GiB {budgets[r['node']] / GIB:5.2f} GiB "
                     f"{r['work_share']:5.0%} "
                     + (f"{step * 1000:5.0f} ms" if step else f"{'—':>8}"))
    if any(r["macs_per_token"] for r in rows):
        lines.append("WORK: the stage's share of a token's multiply-adds (its layers; the "
                     "output head on the last stage)")
        lines.append(f"STEP: its predicted forward time for {STEP_ROWS} rows at the node's "
                     "calibrated speed (`mlx-node serve --calibrate`); bench measures it")
    return "\n".join(lines)


def bench_text(doc: dict) -> str:
    """One line per benchmark run and per fault scenario of a result document."""

    def secs(x) -> str:
        return "—" if x is None else f"{x:.2f} s"

    rows = [f"{c['backend']} {c['nodes']} node(s) c={r['concurrency']}: "
            f"{r['aggregate_tokens_per_s']:.1f} "
            f"tok/s aggregate, {r['single_stream_tokens_per_s']:.1f} single-stream, TTFT p50 "
            f"{r['ttft_s']['p50'] * 1000:.0f} ms, success {r['success_rate']:.1%}"
            for c in doc["configurations"] for r in c["runs"]]
    rows += [f"{s['backend']} {s['fault']} on {s['node']}"
             + (f" ({s['position']})" if s.get("position") else "")
             + f": success {s['success_rate']:.2%}, "
             f"outputs correct {s['outputs_correct']}, detect {secs(s['detect_s'])}, "
             f"recovered {secs(s['recover_s'])}, "
             f"longest stall {secs(s.get('max_gap_s', s['stall_s']))}"
             + (f" ({s['recovery_error']})" if s.get("recovery_error") else "")
             for s in doc["scenarios"]]
    return "\n".join(rows)


def chaos_passed(c: dict) -> bool:
    """The soak's invariants: every request completed with its fault-free answer, and one
    plan per epoch."""
    return (c["requests"] > 0 and c["succeeded"] == c["requests"]
            and c["identical"] == c["requests"] and c["one_plan_per_epoch"])


def chaos_text(c: dict) -> str:
    """The chaos soak in a few lines."""
    growth = c["rss_growth_after_warmup"]
    kv = [f"{k[:8]} {c['kv_bytes_baseline'].get(k, 0) / 2**20:.1f} -> {v / 2**20:.1f} MiB"
          for k, v in c["kv_bytes_after"].items()]
    kinds = sorted({f["kind"] for f in c["faults"]})
    return "\n".join([
        f"chaos {c['duration_s'] / 60:.0f} min, {c['nodes']} nodes, c={c['concurrency']}: "
        f"{c['succeeded']}/{c['requests']} requests succeeded, {c['identical']} identical to "
        f"the fault-free answer; one plan per epoch: {c['one_plan_per_epoch']}",
        f"{len(c['faults'])} faults ({', '.join(kinds)}); epochs {c['first_epoch']}.."
        f"{max((e['epoch'] for e in c['epochs']), default=c['first_epoch'])}; longest stall "
        f"{c['longest_stall_s']:.2f} s",
        "RSS growth after the first 2 min: " + (", ".join(
            f"{k} {v:+.1%}" for k, v in growth.items()) or "(run shorter than that)"),
        "KV held, before the load -> after it: " + ", ".join(kv),
        *(f"error: {e}" for e in c["errors"][:3]),
        "PASSED" if chaos_passed(c) else "FAILED"])
