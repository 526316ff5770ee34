"""The report's scaling part: what more nodes buy, from a `bench --nodes-sweep` run.

For each node count (per workload and backend): aggregate tokens/s, its ratio to one
node at the same concurrency, scaling efficiency (that ratio divided by the node
count) and per-stream tokens/s with its ratio to one node's. Then "twice the users at
the same speed": N nodes at N x c against one node at c. The report ends with a
one-line verdict per backend and workload for the largest node count measured. Pure:
rows of console/report.py in, Markdown out.

Per-stream tokens/s is a run's `single_stream_tokens_per_s` (console/workload.py
`summarise`): each request's own decode rate (its tokens after the first over the time
between them), averaged over the run's requests. At concurrency 1 it is the
single-stream speed; at concurrency c it is the speed each of c users sees.
"""

from __future__ import annotations

import ipaddress
import statistics
from dataclasses import dataclass

LOCKSTEP_NOTE = ("mlx-ring:pipeline moves one batch in lockstep round the ring, as MLX's "
                 "send/recv requires (no micro-batches), so its scaling is expected to be "
                 "flat: while one rank computes, the others wait.")


def table(header: list[str], body: list[list[str]]) -> str:
    """A Markdown table (console/report.py's sections use it too)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def _x(r: float | None) -> str:
    return "—" if r is None else f"{r:.2f}x"


def microbatches(backend: str, config: dict) -> int | None:
    """Decode groups in flight round the ring (K): the gRPC pipeline's plan `microbatches`
    (0: one per node); 1 for mlx-ring:pipeline, which has no micro-batches;
    None where K does not apply (tensor parallel) or the result file predates it."""
    if backend == "mlx-ring:pipeline":
        return 1
    if backend.startswith("mlx-ring") or "microbatches" not in config.get("plan", {}):
        return None
    return config["plan"]["microbatches"] or config["nodes"]


def workload_of(doc: dict) -> str:
    w = doc["workload"]
    return f"`{w['model']}`, {w['prompt_tokens']}+{w['gen_tokens']} tokens"


@dataclass(eq=False)
class Point:
    """One configuration at one concurrency; repeats (and equal runs in other files)
    folded into their medians."""

    workload: str
    backend: str
    nodes: int
    k: int | None
    concurrency: int
    aggregate: float
    per_stream: float
    config: dict
    doc: dict


def points(rs: list[dict]) -> list[Point]:
    groups: dict[tuple, list[dict]] = {}
    for r in rs:
        key = (workload_of(r["doc"]), r["backend"], r["nodes"],
               microbatches(r["backend"], r["config"]), r["run"]["concurrency"])
        groups.setdefault(key, []).append(r)
    return [Point(*key, statistics.median(r["run"]["aggregate_tokens_per_s"] for r in g),
                  statistics.median(r["run"]["single_stream_tokens_per_s"] for r in g),
                  g[0]["config"], g[0]["doc"])
            for key, g in sorted(groups.items(), key=lambda kv: (
                kv[0][0], kv[0][1], kv[0][4], kv[0][2], kv[0][3] or 0))]


def baseline(p: Point, pts: list[Point], concurrency: int | None = None) -> Point | None:
    """One node of the same workload at `concurrency` (default p's): the same backend's,
    else the gRPC pipeline's (one node runs the whole model either way), else the same
    backend's smallest node count."""
    c = p.concurrency if concurrency is None else concurrency
    same = [q for q in pts if q.workload == p.workload and q.concurrency == c]
    mine = [q for q in same if q.backend == p.backend]
    fewest = min((q.nodes for q in mine), default=0)
    for pick in ([q for q in mine if q.nodes == 1],
                 [q for q in same if q.backend == "pipeline" and q.nodes == 1],
                 [q for q in mine if q.nodes == fewest]):
        if pick:
            return min(pick, key=lambda q: q.k or 0)
    return None


def scaling_rows(rs: list[dict]) -> list[dict]:
    """Per workload, backend, concurrency and node count: aggregate tokens/s, its ratio to
    one node at the same concurrency, efficiency (ratio / node growth) and per-stream
    tokens/s with its ratio to one node's."""
    pts = points(rs)
    out = []
    for p in pts:
        base = baseline(p, pts)
        if base.nodes == p.nodes > 1:  # no fewer nodes at this concurrency
            base = None
        ratio = _ratio(p.aggregate, base.aggregate) if base else None
        out.append({"workload": p.workload, "backend": p.backend, "concurrency": p.concurrency,
                    "nodes": p.nodes, "k": p.k, "aggregate": p.aggregate, "ratio": ratio,
                    "efficiency": None if ratio is None else ratio * base.nodes / p.nodes,
                    "per_stream": p.per_stream,
                    "per_stream_ratio": _ratio(p.per_stream, base.per_stream) if base else None,
                    "base": base})
    return out


def _vs(row: dict) -> str:
    """The ratio, and what it is to where that is not this backend's one node."""
    base = row["base"]
    if base is None:
        return "—"
    note = ("" if base.nodes == 1 and base.backend == row["backend"] else
            f" (vs {base.backend})" if base.nodes == 1 else f" (vs {base.nodes} nodes)")
    return _x(row["ratio"]) + note


def scaling_section(rs: list[dict]) -> str:
    srows = scaling_rows(rs)
    if len({r["nodes"] for r in srows}) < 2:
        return "## Scaling\n\nOnly one node count was measured (use `--nodes-sweep 1,2,3`)."
    several = len({r["workload"] for r in srows}) > 1
    show_k = any(r["k"] is not None for r in srows)
    head = (["workload"] if several else []) + ["backend", "concurrency", "nodes"] + (
        ["micro-batches (K)"] if show_k else []) + [
        "aggregate tok/s", "vs 1 node", "efficiency (ratio / N)",
        "per-stream tok/s (mean per request)", "per-stream vs 1 node"]
    body = [([r["workload"]] if several else []) + [r["backend"], str(r["concurrency"]),
                                                    str(r["nodes"])]
            + ([str(r["k"]) if r["k"] else "—"] if show_k else [])
            + [f"{r['aggregate']:.1f}", _vs(r),
               "—" if r["efficiency"] is None else f"{r['efficiency']:.0%}",
               f"{r['per_stream']:.1f}", _x(r["per_stream_ratio"])] for r in srows]
    parts = ["## Scaling\n\nEach node count against one node at the same concurrency (where "
             "no single node was measured: the smallest node count). Efficiency is that "
             "ratio divided by the growth in nodes. Per-stream tok/s is each request's own "
             "decode rate (its tokens after the first over the time between them), averaged "
             "over the run; at concurrency 1 it is the single-stream speed. Repeats (and "
             "the same configuration in several result files) are folded into their "
             "medians."
             + (" K: decode groups in flight round the ring (1: one batch in lockstep)."
                if show_k else ""), table(head, body)]
    if any(r["backend"] == "mlx-ring:pipeline" for r in srows):
        parts.append(f"Note: {LOCKSTEP_NOTE}")
    parts.append(capacity_section(rs))
    return "\n\n".join(parts)


def comparisons(pts: list[Point]) -> list[tuple[str, Point, Point]]:
    """(kind, N nodes, one node) pairs. "users": N nodes at N x c against one node at c;
    then for the same c both at c ("same"), and both at concurrency 1 ("single")."""
    out = []
    for p in sorted((q for q in pts if q.nodes > 1), key=lambda q: (
            q.workload, q.backend, q.nodes, q.k or 0, q.concurrency)):
        c, rest = divmod(p.concurrency, p.nodes)
        base = baseline(p, pts, c) if not rest and c else None
        if base is None or base.nodes != 1:
            continue
        out.append(("users", p, base))
        for kind, level in ([("same", c)] if c != 1 else []) + [("single", 1)]:
            twin = next((q for q in pts if (q.workload, q.backend, q.nodes, q.k, q.concurrency)
                         == (p.workload, p.backend, p.nodes, p.k, level)), None)
            one = baseline(p, pts, level) if twin else None
            if one is not None and one.nodes == 1 and not any(
                    (twin, one) == (a, b) for _, a, b in out):
                out.append((kind, twin, one))
    return out


KINDS = {"users": "{n}x the users", "same": "the same users", "single": "one stream"}


def capacity_section(rs: list[dict]) -> str:
    pairs = comparisons(points(rs))
    head = "### N times the users at the same speed\n\n"
    if not pairs:
        return head + ("No pair of N nodes at N x c and one node at c was measured (for "
                       "example `--nodes-sweep 1,2 --concurrency 1,16,32`).")
    several = len({p.workload for _, p, _ in pairs}) > 1
    body = []
    for kind, p, b in pairs:
        body.append(([p.workload] if several else []) + [
            p.backend, str(p.nodes), str(p.k) if p.k else "—", KINDS[kind].format(n=p.nodes),
            f"{p.concurrency} vs {b.concurrency}", f"{p.aggregate:.1f} vs {b.aggregate:.1f}",
            f"{p.per_stream:.1f} vs {b.per_stream:.1f}", _x(_ratio(p.aggregate, b.aggregate)),
            _x(_ratio(p.per_stream, b.per_stream))])
    return head + ("N nodes at N times one node's concurrency, against that one node: an "
                   "aggregate ratio near N with a per-stream ratio near 1 means N times the "
                   "users, each served at one node's speed. Below each such row: both at "
                   "one node's concurrency, and both with one stream, where measured.\n\n"
                   + table((["workload"] if several else []) + [
                       "backend", "nodes", "K", "comparison", "concurrency", "aggregate tok/s",
                       "per-stream tok/s", "aggregate ratio", "per-stream ratio"], body))


def _host(address: str) -> str:
    host = address.rsplit(":", 1)[0] if ":" in address else address
    return host.strip("[]")


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def link_of(configs: list[dict], doc: dict) -> str:
    """Where the nodes talked: the result files record addresses, not a link speed."""
    hosts = {_host(e.get("address", "")) for c in configs for e in c.get("environment", [])}
    cpus = doc["workload"].get("cpus_per_node")
    pinned = "" if not cpus else (", each node on its own core" if cpus == 1 else
                                  f", each node on its own {cpus} cores")
    if hosts and all(_loopback(h) for h in hosts):
        return f"loopback (one host{pinned})"
    if len(hosts) == 1:
        return f"one host ({hosts.pop()}{pinned})"
    return f"the network between {len(hosts)} hosts (its speed is not in the results)"


def memory_of(config: dict) -> int | None:
    """The configuration's summed memory budgets (memory_total where a node sets none);
    None where a node's capabilities are missing."""
    env = config.get("environment", [])
    if len(env) != config["nodes"]:
        return None
    return sum(int(e.get("memory_budget") or e.get("memory_total") or 0) for e in env) or None


def verdict_line(p: Point, b: Point, pts: list[Point], one_host: bool) -> str:
    k = f" with {p.k} micro-batches" if p.k and p.k > 1 else ""
    line = (f"{p.nodes} nodes{k} at concurrency {p.concurrency}: "
            f"{p.aggregate / b.aggregate:.2f}× the throughput of one at concurrency "
            f"{b.concurrency}")
    if b.per_stream:
        line += f", {p.per_stream / b.per_stream:.2f}× its per-stream speed"
    single = [(q, baseline(q, pts, 1)) for q in pts if q.concurrency == 1 and
              (q.workload, q.backend, q.nodes, q.k) == (p.workload, p.backend, p.nodes, p.k)]
    if b.concurrency != 1 and single and single[0][1] and single[0][1].nodes == 1 and (
            single[0][1].per_stream):
        q, one = single[0]
        line += f" ({q.per_stream / one.per_stream:.2f}× at concurrency 1)"
    mine, theirs = memory_of(p.config), memory_of(b.config)
    if mine and theirs:
        line += f", {mine / theirs:.2g}× its memory budget" + (
            " (the nodes share one host's memory)" if one_host and p.nodes > 1 else "")
    return line + "."


def verdict_section(rs: list[dict]) -> str:
    """One line per backend and workload, for the largest node count measured.

    The comparison is chosen so that it answers "what do N nodes buy": where the sweep
    has N nodes at N x c and one node at c (per-node concurrency scaling), the pair with
    the highest c; otherwise the highest concurrency measured on both N nodes and one.
    Among several K at the largest node count, the one with the most throughput in that
    comparison. The link is what the addresses say (loopback, one host, several hosts);
    memory is the summed memory budgets of the nodes against one node's."""
    pts = points(rs)
    lines = []
    for workload, backend in sorted({(p.workload, p.backend) for p in pts}):
        mine = [p for p in pts if (p.workload, p.backend) == (workload, backend)]
        top = max(p.nodes for p in mine)
        if top < 2:
            continue
        scaled = [(p, b) for kind, p, b in comparisons(pts)
                  if kind == "users" and p in mine and p.nodes == top]
        equal = [(p, baseline(p, pts)) for p in mine if p.nodes == top]
        equal = [(p, b) for p, b in equal if b is not None and b.nodes == 1]
        pairs = [(p, b) for p, b in scaled or equal if b.aggregate]
        if not pairs:
            continue
        p, b = max(pairs, key=lambda pb: (pb[1].concurrency, pb[0].aggregate / pb[1].aggregate))
        link = link_of([p.config, b.config], p.doc)
        line = (f"- **{backend}**, {workload}, over {link}: "
                + verdict_line(p, b, pts, link.startswith(("loopback", "one host"))))
        if backend == "mlx-ring:pipeline":
            line += f" {LOCKSTEP_NOTE}"
        lines.append(line)
    if not lines:
        return ""
    return "## Verdict\n\n" + "\n".join(lines)
