"""The report's chaos section: what `mlx-cluster bench --scenario chaos` saw over a soak
(console/chaos.py). Pure: result documents in, Markdown out."""

from __future__ import annotations

from console.views import chaos_passed

MIB = 2**20


def _table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])


def chaos_section(docs: list[dict]) -> str:
    runs = [d["chaos"] for d in docs if d.get("chaos")]
    if not runs:
        return ""
    parts = ["## Chaos soak\n\nStreaming chat load through the API while faults take turns "
             "(a kill with a restart, latency, frame loss, a partition), each on a random "
             "member of the plan, with time for the recovery after each. Checked the whole "
             "time: every request completes, every greedy answer equals its fault-free "
             "answer, and every node that reports an epoch reports the same plan for it."]
    for c in runs:
        kinds = {}
        for f in c["faults"]:
            kinds[f["kind"]] = kinds.get(f["kind"], 0) + 1
        rejoins = [f["rejoin_s"] for f in c["faults"] if f.get("rejoin_s") is not None]
        head = (f"`{c['model']}`, {c['nodes']} nodes, concurrency {c['concurrency']}, "
                f"{c['duration_s'] / 60:.0f} min, {c['tokens']} tokens per request, seed "
                f"{c['seed']}: **{'passed' if chaos_passed(c) else 'FAILED'}**.")
        body = [["requests succeeded", f"{c['succeeded']}/{c['requests']}"],
                ["answers identical to the fault-free run", f"{c['identical']}/{c['requests']}"],
                ["one plan per epoch", "yes" if c["one_plan_per_epoch"] else "NO"],
                ["faults", ", ".join(f"{k} x{n}" for k, n in sorted(kinds.items()))],
                ["epochs", f"{c['first_epoch']} to "
                           f"{max((e['epoch'] for e in c['epochs']), default=c['first_epoch'])}"],
                ["back in the plan after a kill or partition",
                 f"{min(rejoins):.1f}-{max(rejoins):.1f} s" if rejoins else "—"],
                ["longest stall of a stream", f"{c['longest_stall_s']:.2f} s"]]
        growth = [[k, f"{v:+.1%}"] for k, v in sorted(c["rss_growth_after_warmup"].items())]
        kv = [[k[:8], f"{c['kv_bytes_baseline'].get(k, 0) / MIB:.2f}", f"{v / MIB:.2f}"]
              for k, v in sorted(c["kv_bytes_after"].items())]
        parts.append(head + "\n\n" + _table(["", ""], body)
                     + "\n\nRSS growth of each node process after its first 2 minutes:\n\n"
                     + (_table(["process", "growth"], growth) if growth else "(none ran "
                        "that long)")
                     + "\n\nKV held by each node (MLX memory less weights and prefix cache), "
                       "MiB:\n\n" + _table(["node", "before the load", "after it stopped"], kv)
                     + ("\n\nErrors:\n" + "\n".join(f"- {e}" for e in c["errors"])
                        if c["errors"] else ""))
    return "\n\n".join(parts)
