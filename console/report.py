"""`mlx-cluster report`: a Markdown comparison report from benchmark result files.

The shape follows a serving analysis: executive summary with the winner per metric,
throughput per node configuration, latency percentiles, memory, communication overhead,
scaling per node count (console/report_scaling.py), reliability under load, fault
recovery, recommendations derived from the numbers, and a closing verdict per backend.
Every figure comes from the result files; a section without data says so instead of
inventing one. PNG charts (latency CDF, throughput vs concurrency, scaling) are drawn with
matplotlib when the `report` extra is installed.
"""

from __future__ import annotations

import json
from pathlib import Path

from console.bench import SCHEMA, validate_results
from console.client import ClusterError
from console.report_chaos import chaos_section
from console.report_scaling import (
    LOCKSTEP_NOTE,
    microbatches,
    scaling_rows,
    scaling_section,
    table,
    verdict_section,
)
from node.plan import GIB

# what tests/bench/peers.py --json writes: serve-api beside mlx_lm.server on one machine
PEERS_SCHEMA = "mlx-cluster-peers/1"
PEERS_KEYS = ("model", "machine", "reference", "systems", "levels", "repeats", "max_tokens",
              "median_tok_s", "ratio")


def validate_peers(doc: dict) -> list[str]:
    """Problems with a peers.py result document (empty when it is whole)."""
    problems = [f"missing {key}" for key in PEERS_KEYS if key not in doc]
    for key in ("median_tok_s", "ratio"):
        for system in doc.get("systems", []):
            for level in doc.get("levels", []):
                if not isinstance(doc.get(key, {}).get(system, {}).get(str(level)),
                                  int | float):
                    problems.append(f"{key}[{system!r}][{level}] missing")
    return problems


def load_results(paths: list[Path]) -> list[dict]:
    docs = []
    for path in paths:
        try:
            doc = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ClusterError(f"cannot read results {path}: {e}") from e
        if doc.get("schema") not in (SCHEMA, PEERS_SCHEMA):
            raise ClusterError(f"{path} is not a {SCHEMA} (mlx-cluster bench) or "
                               f"{PEERS_SCHEMA} (tests/bench/peers.py) result file "
                               f"(schema: {doc.get('schema')!r})")
        problems = validate_results(doc) if doc["schema"] == SCHEMA else validate_peers(doc)
        if problems:
            raise ClusterError(f"{path} is incomplete: " + "; ".join(problems[:5]))
        doc["_source"] = str(path)
        docs.append(doc)
    return docs


def config_backend(doc: dict, config: dict) -> str:
    """A configuration's backend (files from before per-configuration backends: the doc's)."""
    return config.get("backend") or doc.get("backend", "pipeline")


def config_label(backend: str, config: dict) -> str:
    """"pipeline · 2 node(s)", with K where more than one micro-batch was in flight."""
    k = microbatches(backend, config)
    return f"{backend} · {config['nodes']} node(s)" + (f" · K={k}" if k and k > 1 else "")


def rows(docs: list[dict]) -> list[dict]:
    """One flat row per (result file, node configuration, concurrency, repeat)."""
    out = []
    for doc in docs:
        for config in doc["configurations"]:
            for run in config["runs"]:
                backend = config_backend(doc, config)
                out.append({"label": config_label(backend, config),
                            "backend": backend, "nodes": config["nodes"],
                            "config": config, "run": run, "doc": doc})
    return out


def f1(x: float) -> str:
    return f"{x:.1f}"


def ms(x: float) -> str:
    return f"{x * 1000:.1f}"


def winner(candidates: list[dict], key, best=max) -> dict | None:
    scored = [c for c in candidates if key(c) is not None]
    return best(scored, key=key) if scored else None


def summary_section(rs: list[dict]) -> str:
    metrics = [
        ("Aggregate output tokens/s", lambda r: r["run"]["aggregate_tokens_per_s"], max,
         lambda v: f"{v:.1f} tok/s"),
        ("Single-stream tokens/s", lambda r: r["run"]["single_stream_tokens_per_s"], max,
         lambda v: f"{v:.1f} tok/s"),
        ("Lowest TTFT p50", lambda r: r["run"]["ttft_s"]["p50"] or None, min,
         lambda v: f"{v * 1000:.1f} ms"),
        ("Lowest inter-token p99", lambda r: r["run"]["itl_s"]["p99"] or None, min,
         lambda v: f"{v * 1000:.1f} ms"),
        ("Success rate", lambda r: r["run"]["success_rate"], max, lambda v: f"{v:.1%}"),
    ]
    body = []
    for name, key, best, fmt in metrics:
        w = winner(rs, key, best)
        if w is not None:
            body.append([name, f"{w['label']}, concurrency {w['run']['concurrency']}",
                         fmt(key(w))])
    return "## Executive summary\n\n" + table(["metric", "winner", "value"], body)


def throughput_section(rs: list[dict]) -> str:
    body = [[r["label"], str(r["run"]["concurrency"]), f1(r["run"]["single_stream_tokens_per_s"]),
             f1(r["run"]["aggregate_tokens_per_s"]), str(r["run"]["output_tokens"]),
             f"{r['run']['wall_s']:.2f}"] for r in rs]
    return "## Throughput per node configuration\n\n" + table(
        ["configuration", "concurrency", "single-stream tok/s", "aggregate tok/s",
         "output tokens", "wall s"], body)


def latency_section(rs: list[dict]) -> str:
    body = []
    for r in rs:
        for metric in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
            p = r["run"][metric]
            body.append([r["label"], str(r["run"]["concurrency"]), metric[:-2].upper(),
                         ms(p["p50"]), ms(p["p90"]), ms(p["p95"]), ms(p["p99"])])
    return "## Latency percentiles (ms)\n\n" + table(
        ["configuration", "concurrency", "metric", "p50", "p90", "p95", "p99"], body)


def memory_section(docs: list[dict]) -> str:
    body = []
    for doc in docs:
        for config in doc["configurations"]:
            for m in config["memory"]:
                body.append([config_label(config_backend(doc, config), config),
                             m.get("name") or m["address"], f"{m['after_load_bytes'] / GIB:.3f}",
                             f"{m['peak_bytes'] / GIB:.3f}", f"{m['steady_bytes'] / GIB:.3f}"])
    return "## Memory per node (GiB held by MLX)\n\n" + table(
        ["configuration", "node", "after load", "peak", "steady"], body)


def communication_section(rs: list[dict]) -> str:
    body = []
    for r in rs:
        c = r["run"]["communication"]
        if c.get("bytes_per_token_per_hop") is None:  # inside MLX's own sockets
            body.append([r["label"], str(r["run"]["concurrency"]), "—", "not seen (MLX)",
                         "—", "—", "—"])
            continue
        body.append([r["label"], str(r["run"]["concurrency"]), str(c["hops_per_token"]),
                     f"{c['bytes_per_token_per_hop']:.0f}", ms(c["hop_p50_s"]),
                     ms(c["compute_s_per_token"]), ms(c["transfer_s_per_token"])])
    return ("## Communication overhead\n\nPer generated token: hops crossed, bytes sent per "
            "hop (prompt activations included), one-way hop latency (p50), and the split of "
            "a token's time into compute (sum of per-shard step p50) and transfer (hops x "
            "hop p50). mlx-ring traffic moves inside MLX's own sockets, which the node "
            "services cannot count; its rows say so.\n\n" + table(
                ["configuration", "concurrency", "hops/token", "bytes/token/hop",
                 "hop p50 ms", "compute ms/token", "transfer ms/token"], body))


def reliability_section(rs: list[dict]) -> str:
    body = [[r["label"], str(r["run"]["concurrency"]), str(r["run"]["requests"]),
             str(r["run"]["succeeded"]), f"{r['run']['success_rate']:.1%}",
             ", ".join(f"{k}: {v}" for k, v in sorted(r["run"]["failures"].items())) or "none"]
            for r in rs]
    return "## Reliability under load\n\n" + table(
        ["configuration", "concurrency", "requests", "succeeded", "success rate",
         "failures by kind"], body)


def backend_groups(rs: list[dict]) -> list[tuple[tuple[int, int], list[dict]]]:
    """Rows of the same node count and concurrency, one per backend (first repeat)."""
    groups: dict[tuple[int, int], dict[str, dict]] = {}
    for r in rs:
        key = (r["nodes"], r["run"]["concurrency"])
        groups.setdefault(key, {}).setdefault(r["backend"], r)
    return [(k, list(v.values())) for k, v in sorted(groups.items()) if len(v) > 1]


def backends_section(rs: list[dict]) -> str:
    groups = backend_groups(rs)
    if not groups:
        return ("## Backends side by side\n\nThese results hold one backend; run `mlx-cluster "
                "bench --backend pipeline,mlx-ring:tensor,mlx-ring:pipeline` to compare.")
    parts = ["## Backends side by side\n\nThe same workload on the same nodes, one backend "
             "after another. Ratios are to the gRPC pipeline (or the first backend run)."]
    for (nodes, conc), group in groups:
        base = next((r for r in group if r["backend"] == "pipeline"), group[0])
        base_tps = base["run"]["aggregate_tokens_per_s"]
        body = [[r["backend"], f1(r["run"]["single_stream_tokens_per_s"]),
                 f1(r["run"]["aggregate_tokens_per_s"]),
                 f"{r['run']['aggregate_tokens_per_s'] / base_tps:.2f}x" if base_tps else "—",
                 ms(r["run"]["ttft_s"]["p50"]), ms(r["run"]["itl_s"]["p50"]),
                 ms(r["run"]["itl_s"]["p99"]), f"{r['run']['success_rate']:.0%}"]
                for r in group]
        parts.append(f"**{nodes} node(s), concurrency {conc}**\n\n" + table(
            ["backend", "single-stream tok/s", "aggregate tok/s", f"vs {base['backend']}",
             "TTFT p50 ms", "ITL p50 ms", "ITL p99 ms", "success"], body))
    if any(r["backend"] == "mlx-ring:pipeline" for _, group in groups for r in group):
        parts.append(f"Note: {LOCKSTEP_NOTE}")
    return "\n\n".join(parts)


def fault_section(docs: list[dict]) -> str:
    scenarios = [s for d in docs for s in d.get("scenarios", [])]
    if not scenarios:
        return "## Fault recovery\n\nNo fault scenarios in these results."
    def opt(x) -> str:
        return "—" if x is None else ms(x)

    body = [[s.get("backend", "pipeline"),
             s["fault"] + ("" if s.get("injected", True) else " (not injected)"),
             (f"{s['position']}: " if s.get("position") else "") + s["node"],
             f"{ok_count(s)}/{s['requests']} @ c={s['concurrency']}",
             ("yes" if s["outputs_correct"] else "NO")
             + (f" ({s['correct_outputs']}/{s['requests']})" if "correct_outputs" in s else ""),
             opt(s.get("max_gap_s", s["stall_s"])), opt(s["detect_s"]), opt(s["recover_s"]),
             opt(s["first_token_s"]), str(s.get("resumed", "—"))] for s in scenarios]
    errors = [f"- {s['fault']} {s.get('position', '')}: recovery failed: {s['recovery_error']}"
              for s in scenarios
              if s.get("recovery_error")]
    return ("## Fault recovery\n\nOne row per fault and node position (entry: the plan's "
            "first shard, where requests enter; middle; last). Requests ok: requests that "
            "got every token. Outputs equal: the successful requests' tokens are the "
            "fault-free run's, token for token (how many of all). Longest stall: the longest "
            "wait between two tokens of one request. Detect: last good heartbeat to declared "
            "down. Recover: detect + re-plan + reload of the survivors. First token: "
            "survivors loaded to the first token of a resumed request. Resumed: requests "
            "continued on a new entry node.\n\n" + table(
                ["backend", "fault", "node", "requests ok", "outputs equal",
                 "longest stall ms", "detect ms", "recover ms", "first token ms", "resumed"],
                body) + ("\n\n" + "\n".join(errors) if errors else ""))


def ok_count(s: dict) -> int:
    """A scenario's successful requests (files from before `succeeded`: from the rate)."""
    return s["succeeded"] if "succeeded" in s else round(s["success_rate"] * s["requests"])


def recommendations(rs: list[dict]) -> str:
    tips = []
    singles = [r for r in rs if r["run"]["concurrency"] == 1]
    if len({r["nodes"] for r in singles}) > 1:
        best = max(singles, key=lambda r: r["run"]["single_stream_tokens_per_s"])
        worst = min(singles, key=lambda r: r["run"]["single_stream_tokens_per_s"])
        if best["run"]["single_stream_tokens_per_s"]:
            cost = 1 - worst["run"]["single_stream_tokens_per_s"] / best["run"][
                "single_stream_tokens_per_s"]
            tips.append(f"For one user at a time, {best['label']} is fastest "
                        f"({best['run']['single_stream_tokens_per_s']:.1f} tok/s); "
                        f"{worst['label']} is {cost:.0%} slower per stream. Split a model "
                        f"across nodes when it does not fit one, not for single-stream speed.")
    for label in sorted({r["label"] for r in rs}):
        levels = sorted((r for r in rs if r["label"] == label),
                        key=lambda r: r["run"]["concurrency"])
        if len(levels) > 1 and levels[0]["run"]["aggregate_tokens_per_s"]:
            gain = levels[-1]["run"]["aggregate_tokens_per_s"] / levels[0]["run"][
                "aggregate_tokens_per_s"]
            tips.append(f"{label}: concurrency {levels[-1]['run']['concurrency']} gives "
                        f"{gain:.2f}x the aggregate throughput of concurrency "
                        f"{levels[0]['run']['concurrency']}" + (
                            "; serve several users at once to use the pipeline's stages."
                            if gain > 1.1 else "; requests mostly queue here."))
    failing = [r for r in rs if r["run"]["success_rate"] < 1]
    if failing:
        tips.append("Some runs lost requests (" + ", ".join(
            f"{r['label']} c={r['run']['concurrency']}" for r in failing) +
            "): see reliability above before trusting their latency figures.")
    comm = [r for r in rs if r["run"]["communication"]["compute_s_per_token"]]
    if comm:
        r = max(comm, key=lambda r: r["nodes"])
        c = r["run"]["communication"]
        share = c["transfer_s_per_token"] / (c["transfer_s_per_token"] + c["compute_s_per_token"])
        tips.append(f"On {r['label']}, moving activations is {share:.0%} of a token's time "
                    f"({ms(c['transfer_s_per_token'])} ms of transfer vs "
                    f"{ms(c['compute_s_per_token'])} ms of compute).")
    return "## Recommendations\n\n" + "\n".join(f"- {t}" for t in tips or ["Not enough runs "
                                                                          "to compare."])


def environment_section(docs: list[dict]) -> str:
    lines = []
    for doc in docs:
        w = doc["workload"]
        lines.append(f"- `{doc['_source']}`: {doc.get('backend', 'pipeline')}, model "
                     f"`{w['model']}`, {w['prompt_tokens']}-token prompts, {w['gen_tokens']} "
                     f"generated tokens (EOS banned), {w['requests']} requests per run, "
                     f"concurrency {w['concurrency']}, warm-up {w['warmup']}, strategy "
                     f"{w['strategy']}")
        env = doc["configurations"][-1]["environment"] if doc["configurations"] else []
        for s in doc.get("scenarios", []):
            lines.append(f"  - scenario `{s['fault']}` on {s['node']}"
                         + (f" ({s['position']})" if s.get("position") else ""))
        for e in env[:4]:
            lines.append(f"  - {e.get('name')}: {e.get('chip')}, {e.get('cpu_count')} CPUs, "
                         f"{e.get('memory_total', 0) / GIB:.1f} GiB, MLX {e.get('mlx_version')}"
                         f" on {e.get('mlx_device')}, BLAS {e.get('blas')}")
    return "## Setup\n\n" + "\n".join(lines)


def charts(rs: list[dict], out_dir: Path, stem: str) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rs:
        samples = sorted(r["run"].get("itl_samples", []))
        if samples:
            ax.plot([s * 1000 for s in samples],
                    [(i + 1) / len(samples) for i in range(len(samples))],
                    label=f"{r['label']} c={r['run']['concurrency']}")
    ax.set(xlabel="inter-token latency (ms)", ylabel="fraction of tokens",
           title="Inter-token latency CDF")
    ax.legend(fontsize=7)
    path = out_dir / f"{stem}-latency-cdf.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    written.append(path)
    fig, ax = plt.subplots(figsize=(7, 4))
    for label in sorted({r["label"] for r in rs}):
        pts = sorted((r["run"]["concurrency"], r["run"]["aggregate_tokens_per_s"])
                     for r in rs if r["label"] == label)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set(xlabel="concurrency", ylabel="aggregate output tokens/s",
           title="Throughput vs concurrency")
    ax.legend()
    path = out_dir / f"{stem}-throughput.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    written.append(path)
    groups = backend_groups(rs)
    if groups:
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
        width = 0.8 / len(groups)
        names = sorted({r["backend"] for _, g in groups for r in g})
        for i, ((nodes, conc), group) in enumerate(groups):
            by = {r["backend"]: r["run"] for r in group}
            xs = [j + i * width for j in range(len(names))]
            left.bar(xs, [by[n]["aggregate_tokens_per_s"] if n in by else 0 for n in names],
                     width, label=f"{nodes} node(s), c={conc}")
            right.bar(xs, [by[n]["itl_s"]["p99"] * 1000 if n in by else 0 for n in names],
                      width, color="lightgray", edgecolor="gray")
            right.bar(xs, [by[n]["itl_s"]["p50"] * 1000 if n in by else 0 for n in names],
                      width * 0.6, label=f"{nodes} node(s), c={conc}")
        for ax in (left, right):
            ax.set_xticks([j + width * (len(groups) - 1) / 2 for j in range(len(names))],
                          names, fontsize=8)
        left.set(ylabel="aggregate output tokens/s", title="Throughput by backend")
        right.set(ylabel="inter-token latency (ms)", title="ITL p50 (bars) and p99 (grey)")
        left.legend(fontsize=7)
        path = out_dir / f"{stem}-backends.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    srows = scaling_rows(rs)
    if len({r["nodes"] for r in srows}) > 1:
        fig, ax = plt.subplots(figsize=(7, 4))
        several = len({r["workload"] for r in srows}) > 1
        for key in sorted({(r["workload"], r["backend"], r["k"] or 0, r["concurrency"])
                           for r in srows}):
            pts = [(r["nodes"], r["aggregate"]) for r in srows
                   if (r["workload"], r["backend"], r["k"] or 0, r["concurrency"]) == key]
            workload, backend, k, conc = key
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                    label=(f"{workload}, " if several else "") + backend
                    + (f" K={k}" if k > 1 else "") + f", concurrency {conc}")
        ax.set(xlabel="nodes", ylabel="aggregate output tokens/s", title="Scaling")
        ax.legend()
        path = out_dir / f"{stem}-scaling.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written


def peers_section(docs: list[dict]) -> str:
    """serve-api against mlx_lm.server, as tests/bench/peers.py measured it."""
    parts = []
    for doc in docs:
        m, levels, ref = doc["machine"], doc["levels"], doc["reference"]
        ttft = doc.get("median_ttft_s", {})
        paired = doc.get("paired_ratio", {})  # each round's own ratio, their median
        head = ["system"]
        for c in levels:
            head += [f"c={c} tok/s", f"vs {ref}"] + (["paired"] if paired else []) + (
                [f"c={c} TTFT ms"] if ttft else [])
        body = []
        for system in doc["systems"]:
            row = [f"`{system}`"]
            for c in levels:
                row += [f1(doc["median_tok_s"][system][str(c)]),
                        f"{doc['ratio'][system][str(c)]:.2f}"]
                if paired:
                    row.append(f"{paired.get(system, {}).get(str(c), 0.0):.2f}")
                if ttft:
                    row.append(ms(ttft.get(system, {}).get(str(c), 0.0)))
            body.append(row)
        note = " (paired: the median of each round's own ratio)" if paired else ""
        parts.append(
            f"`{doc['_source']}`: model `{doc['model']}`, the same streamed chat prompts through "
            f"the official openai client, max_tokens {doc['max_tokens']}, greedy; medians of "
            f"{doc['repeats']} interleaved round(s){note} on one machine ({m.get('cpus')} CPUs, "
            f"{m.get('platform')}, BLAS {m.get('blas')}).\n\n" + table(head, body))
    return f"## Compared with {docs[0]['reference']}\n\n" + "\n\n".join(parts)


def render(docs: list[dict], chart_names: list[str] | None = None) -> str:
    peers = [d for d in docs if d.get("schema") == PEERS_SCHEMA]
    docs = [d for d in docs if d.get("schema") != PEERS_SCHEMA]
    rs = rows(docs)
    if peers and not docs:
        return "\n\n".join(["# Cluster benchmark report", peers_section(peers)]) + "\n"
    chaos = chaos_section(docs)
    if not rs and not any(d.get("scenarios") for d in docs) and not chaos:
        raise ClusterError("the result files hold no runs")
    if not rs:  # fault scenarios only
        return "\n\n".join(["# Cluster fault report", environment_section(docs),
                             *([fault_section(docs)] if not chaos or any(
                                 d.get("scenarios") for d in docs) else []),
                             *([chaos] if chaos else [])]) + "\n"
    parts = ["# Cluster benchmark report",
             "Every number below was measured by `mlx-cluster bench` on the machines named in "
             "the setup section; rerun it to check them.",
             summary_section(rs), *([peers_section(peers)] if peers else []),
             environment_section(docs), backends_section(rs),
             throughput_section(rs),
             latency_section(rs), memory_section(docs), communication_section(rs),
             scaling_section(rs), reliability_section(rs), fault_section(docs),
             *([chaos] if chaos else []), recommendations(rs)]
    if chart_names:
        parts.append("## Charts\n\n" + "\n\n".join(f"![{n}]({n})" for n in chart_names))
    verdict = verdict_section(rs)  # last: what the cluster buys, in one line per backend
    return "\n\n".join(parts + ([verdict] if verdict else [])) + "\n"


def write_report(docs: list[dict], output: Path) -> list[Path]:
    output.parent.mkdir(parents=True, exist_ok=True)
    rs = rows([d for d in docs if d.get("schema") != PEERS_SCHEMA])
    pngs = charts(rs, output.parent, output.stem) if rs else []  # (a chaos soak: no runs)
    output.write_text(render(docs, [p.name for p in pngs]))
    return [output, *pngs]
