"""`mlx-cluster bench` on real local clusters, and the report built from its JSON."""

from __future__ import annotations

import json
import os
import re

import pytest

from console.bench import validate_results
from console.workload import percentiles
from tests.helpers import mlx_cluster

pytestmark = pytest.mark.cluster


def test_percentiles_nearest_rank():
    p = percentiles([float(x) for x in range(1, 101)])
    assert (p["p50"], p["p90"], p["p95"], p["p99"], p["max"], p["n"]) == (50, 90, 95, 99, 100,
                                                                           100)
    assert percentiles([])["p99"] == 0.0


def test_bench_sweep_then_report_numbers_match_the_json(tmp_path):
    env = dict(os.environ, MLX_CLUSTER=str(tmp_path / "cluster.json"))
    out, report = tmp_path / "r.json", tmp_path / "rep" / "report.md"
    res = mlx_cluster("bench", "--local", "--nodes-sweep", "1,2", "--model", "synthetic:tiny",
                      "--prompt-tokens", "24", "--gen-tokens", "8", "--requests", "4",
                      "--concurrency", "1,2", "--out", str(out), env=env, timeout=600)
    assert res.returncode == 0, res.stderr
    doc = json.loads(out.read_text())
    assert validate_results(doc) == []
    configs = doc["configurations"]
    assert [c["nodes"] for c in configs] == [1, 2]
    for config in configs:
        assert [r["concurrency"] for r in config["runs"]] == [1, 2]
        assert [(s["start_layer"], s["end_layer"]) for s in config["plan"]["shards"]][-1][1] == 7
        for run in config["runs"]:
            assert run["success_rate"] == 1.0 and run["output_tokens"] == 4 * 8
            assert all(len(o) == 8 for o in run["outputs"])
            assert 0 < run["ttft_s"]["p50"] <= run["ttft_s"]["p99"]
        # greedy outputs do not depend on concurrency
        assert config["runs"][0]["outputs"] == config["runs"][1]["outputs"]
    assert configs[0]["runs"][0]["outputs"] == configs[1]["runs"][0]["outputs"]
    assert configs[1]["runs"][0]["communication"]["bytes_per_token_per_hop"] > 64 * 4

    res = mlx_cluster("report", str(out), "-o", str(report), env=env)
    assert res.returncode == 0, res.stderr
    text = report.read_text()
    for section in ("Executive summary", "Throughput per node configuration",
                    "Latency percentiles", "Memory per node", "Communication overhead",
                    "Scaling", "Reliability under load", "Fault recovery", "Recommendations"):
        assert f"## {section}" in text
    for config in configs:
        for run in config["runs"]:
            n = config["nodes"]  # one micro-batch per node by default
            label = f"pipeline · {n} node(s)" + (f" · K={n}" if n > 1 else "")
            row = (f"| {label} | {run['concurrency']} | "
                   f"{run['single_stream_tokens_per_s']:.1f} | "
                   f"{run['aggregate_tokens_per_s']:.1f} | {run['output_tokens']} |")
            assert row in text
            ttft = run["ttft_s"]
            assert (f"| {label} | {run['concurrency']} | TTFT | {ttft['p50'] * 1000:.1f} | "
                    f"{ttft['p90'] * 1000:.1f} | {ttft['p95'] * 1000:.1f} | "
                    f"{ttft['p99'] * 1000:.1f} |") in text
    best = max((r for c in configs for r in c["runs"]),
               key=lambda r: r["aggregate_tokens_per_s"])
    assert re.search(rf"Aggregate output tokens/s \| .* \| {best['aggregate_tokens_per_s']:.1f} "
                     r"tok/s \|", text)


def test_backend_sweep_runs_every_backend_on_the_same_nodes_and_reports_side_by_side(
        tmp_path):
    env = dict(os.environ, MLX_CLUSTER=str(tmp_path / "cluster.json"))
    out, report = tmp_path / "b.json", tmp_path / "rep" / "backends.md"
    res = mlx_cluster("bench", "--local", "--nodes-sweep", "2", "--model", "synthetic:tiny",
                      "--prompt-tokens", "16", "--gen-tokens", "6", "--requests", "2",
                      "--backend", "pipeline,mlx-ring:tensor,mlx-ring:pipeline",
                      "--out", str(out), env=env, timeout=600)
    assert res.returncode == 0, res.stderr
    doc = json.loads(out.read_text())
    assert validate_results(doc) == []
    configs = doc["configurations"]
    assert [c["backend"] for c in configs] == ["pipeline", "mlx-ring:tensor",
                                               "mlx-ring:pipeline"]
    assert {tuple(s["address"] for s in c["plan"]["shards"]) for c in configs} == {
        tuple(s["address"] for s in configs[0]["plan"]["shards"])}  # the same nodes
    outputs = [c["runs"][0]["outputs"] for c in configs]
    assert outputs[0] == outputs[1] == outputs[2]  # greedy tokens agree across backends
    assert configs[1]["runs"][0]["communication"]["bytes_per_token_per_hop"] is None

    res = mlx_cluster("report", str(out), "-o", str(report), env=env)
    assert res.returncode == 0, res.stderr
    text = report.read_text()
    side = text.split("## Backends side by side")[1].split("\n## ")[0]
    base = configs[0]["runs"][0]["aggregate_tokens_per_s"]
    for config in configs:
        run = config["runs"][0]
        assert (f"| {config['backend']} | {run['single_stream_tokens_per_s']:.1f} | "
                f"{run['aggregate_tokens_per_s']:.1f} | "
                f"{run['aggregate_tokens_per_s'] / base:.2f}x |") in side
    assert (report.parent / "backends-backends.png").stat().st_size > 10_000
    assert "![backends-backends.png](backends-backends.png)" in text


def test_report_refuses_files_that_are_not_results(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"schema": "something-else"}))
    res = mlx_cluster("report", str(bad), "-o", str(tmp_path / "r.md"),
                      env=dict(os.environ))
    assert res.returncode == 1 and "is not a mlx-cluster-bench/1" in res.stderr
    assert "mlx-cluster-peers/1" in res.stderr


def test_kill_scenario_under_load_keeps_outputs_and_reports_recovery(tmp_path):
    env = dict(os.environ, MLX_CLUSTER=str(tmp_path / "cluster.json"))
    out, report = tmp_path / "kill.json", tmp_path / "kill.md"
    res = mlx_cluster("bench", "--local", "--scenario", "kill", "--model", "synthetic:tiny",
                      "--prompt-tokens", "16", "--gen-tokens", "8", "--requests", "60",
                      "--concurrency", "4", "--out", str(out), env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    (scenario,) = json.loads(out.read_text())["scenarios"]
    assert scenario["requests"] == 60 and scenario["succeeded"] >= 59
    assert scenario["outputs_correct"] is True
    assert scenario["correct_outputs"] >= 59
    (recovery,) = scenario["recoveries"]
    assert recovery["to_epoch"] == recovery["from_epoch"] + 1 and not recovery["error"]
    assert 0 < scenario["detect_s"] < 3 and scenario["recover_s"] >= scenario["detect_s"]
    res = mlx_cluster("report", str(out), "-o", str(report), env=env)
    assert res.returncode == 0, res.stderr
    text = report.read_text()
    assert "## Fault recovery" in text
    assert scenario["position"] == "last" and scenario["max_gap_s"] > 0
    assert (f"| kill | last: {scenario['node']} | {scenario['succeeded']}/60 @ c=4 | yes "
            f"({scenario['correct_outputs']}/60) | {scenario['max_gap_s'] * 1000:.1f} | "
            f"{scenario['detect_s'] * 1000:.1f} | {scenario['recover_s'] * 1000:.1f} |") in text


def scenario_row(position: str, node: str, succeeded: int, correct: bool, gap: float,
                 recovered: bool = True) -> dict:
    """A scenario as console.scenarios writes it (the report only reads these keys)."""
    return {"fault": "kill", "position": position, "backend": "pipeline", "node": node,
            "requests": 8, "concurrency": 2, "succeeded": succeeded,
            "success_rate": succeeded / 8, "failures": {}, "outputs_correct": correct,
            "correct_outputs": succeeded if correct else 0, "max_gap_s": gap,
            "stall_s": gap, "resumed": 2 if position == "entry" else 0, "injected": True,
            "recoveries": [], "detect_s": 0.5 if recovered else None,
            "recover_s": 0.9 if recovered else None,
            "first_token_s": 0.1 if recovered else None,
            "recovery_error": "" if recovered else "the model no longer fits",
            "aggregate_tokens_per_s": 40.0, "errors": []}


def test_the_fault_report_has_a_row_per_scenario_and_position():
    from console.report import render

    doc = {"schema": "mlx-cluster-bench/1", "created_unix": 0.0, "backend": "pipeline",
           "configurations": [], "_source": "kill.json",
           "workload": {"model": "synthetic:tiny", "prompt_tokens": 16, "gen_tokens": 8,
                        "requests": 8, "concurrency": [2], "warmup": 1,
                        "strategy": "memory"},
           "scenarios": [scenario_row("entry", "local-0", 8, True, 1.234),
                         scenario_row("middle", "local-1", 7, True, 0.8),
                         scenario_row("last", "local-2", 6, False, 0.05, recovered=False)]}
    assert validate_results(doc) == []
    text = render([doc])
    assert ("| pipeline | kill | entry: local-0 | 8/8 @ c=2 | yes (8/8) | 1234.0 | 500.0 | "
            "900.0 | 100.0 | 2 |") in text
    assert "| pipeline | kill | middle: local-1 | 7/8 @ c=2 | yes (7/8) | 800.0 |" in text
    assert "| pipeline | kill | last: local-2 | 6/8 @ c=2 | NO (0/8) | 50.0 | — | — | — | 0 |" in (
        text)
    assert "- kill last: recovery failed: the model no longer fits" in text
    assert "scenario `kill` on local-0 (entry)" in text


def test_node_positions_pick_the_plans_shards_and_refuse_what_the_plan_lacks():
    from console.client import ClusterError
    from console.parser import build_parser
    from console.scenarios import check_positions, victim_of
    from protos import cluster_pb2 as pb

    args = build_parser().parse_args(["bench", "--scenario", "kill", "--node", "entry,last"])
    assert args.node == ["entry", "last"]
    assert build_parser().parse_args(["bench", "--scenario", "kill"]).node == ["last"]
    plan = pb.Plan(shards=[pb.PlanShard(node_id=n) for n in ("a", "b", "c", "d")])
    assert [victim_of(plan, p).node_id for p in ("entry", "middle", "last")] == ["a", "c", "d"]
    two = pb.Plan(shards=[pb.PlanShard(node_id=n) for n in ("a", "b")])
    with pytest.raises(ClusterError, match="--node middle needs 3 or more nodes"):
        victim_of(two, "middle")
    with pytest.raises(ClusterError, match="--node takes entry, middle, last"):
        check_positions(["first"])
    with pytest.raises(ClusterError, match="2 or more nodes"):
        check_positions(["entry"], 1)


def test_several_kill_positions_on_named_nodes_are_refused_before_anything_runs():
    from console.bench import run_bench
    from console.client import ClusterError
    from console.workload import Workload

    work = Workload(model="synthetic:tiny")
    with pytest.raises(ClusterError, match="each position needs a fresh cluster"):
        run_bench(work, ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"], None, False,
                  scenario="kill", positions=["entry", "last"])
    with pytest.raises(ClusterError, match="--node middle needs 3 or more nodes"):
        run_bench(work, None, [2], True, scenario="kill", positions=["middle"])


def test_peers_results_become_a_compared_with_mlx_lm_server_section(tmp_path):
    """tests/bench/peers.py --json output goes into the report as its own section: every
    system's tok/s, its ratio to mlx_lm.server and its TTFT at each concurrency."""
    from console.report import PEERS_SCHEMA, load_results, render

    systems = ["mlx_lm.server", "serve-api 1 node", "serve-api 3 nodes"]
    tok = {"mlx_lm.server": (12.5, 60.0), "serve-api 1 node": (13.5, 66.0),
           "serve-api 3 nodes": (12.0, 57.0)}
    doc = {"schema": PEERS_SCHEMA, "model": "smollm2-135m", "max_tokens": 64, "repeats": 3,
           "machine": {"cpus": 2, "platform": "Linux-x86_64", "blas": "openblas"},
           "reference": "mlx_lm.server", "systems": systems, "levels": [1, 8],
           "median_tok_s": {s: {"1": a, "8": b} for s, (a, b) in tok.items()},
           "ratio": {s: {"1": a / 12.5, "8": b / 60.0} for s, (a, b) in tok.items()},
           "median_ttft_s": {s: {"1": 0.08, "8": 0.25} for s in systems}}
    path = tmp_path / "peers.json"
    path.write_text(json.dumps(doc))
    text = render(load_results([path]))
    assert "## Compared with mlx_lm.server" in text
    assert "| `serve-api 1 node` | 13.5 | 1.08 | 80.0 | 66.0 | 1.10 | 250.0 |" in text
    assert "| `serve-api 3 nodes` | 12.0 | 0.96 | 80.0 | 57.0 | 0.95 | 250.0 |" in text
    # peers.py's paired ratios (the median of each round's own) get their own column
    doc["paired_ratio"] = {s: {"1": 1.0, "8": 1.04} for s in systems}
    doc["paired_ratio"]["serve-api 1 node"] = {"1": 1.11, "8": 1.02}
    path.write_text(json.dumps(doc))
    text = render(load_results([path]))
    assert "| `serve-api 1 node` | 13.5 | 1.08 | 1.11 | 80.0 | 66.0 | 1.10 | 1.02 | 250.0 |" in text
    assert "paired: the median of each round's own ratio" in text
    del doc["ratio"]
    path.write_text(json.dumps(doc))
    res = mlx_cluster("report", str(path), "-o", str(tmp_path / "r.md"), env=dict(os.environ))
    assert res.returncode == 1 and "missing ratio" in res.stderr


GIB = 2**30


def sweep_run(c: int, aggregate: float, per_stream: float, repeat: int = 0) -> dict:
    """One run as console/workload.summarise writes it (the report reads these keys)."""
    p = {"p50": 0.01, "p90": 0.02, "p95": 0.02, "p99": 0.03, "mean": 0.01, "max": 0.03, "n": 8}
    return {"concurrency": c, "requests": 64, "succeeded": 64, "success_rate": 1.0,
            "failures": {}, "wall_s": 64 * 64 / aggregate, "output_tokens": 64 * 64,
            "aggregate_tokens_per_s": aggregate, "single_stream_tokens_per_s": per_stream,
            "ttft_s": p, "tpot_s": p, "itl_s": p, "e2e_s": p, "repeat": repeat,
            "itl_samples": [0.01, 0.012, 0.02],
            "communication": {"hops_per_token": 1, "bytes_per_token_per_hop": None,
                              "hop_p50_s": None, "compute_s_per_token": None,
                              "transfer_s_per_token": None}, "outputs": []}


def sweep_config(nodes: int, runs: list[dict], backend: str = "pipeline", k: int | None = 1,
                 budgets: list[float] | None = None, host: str = "127.0.0.1") -> dict:
    """A configuration as console/bench.bench_cluster writes it: the plan (with its
    `microbatches` unless k is None, as in files from before micro-batches) and each
    node's capabilities in `environment`."""
    plan = {"model": "smollm2-135m", "backend": backend.split(":")[0], "shards": []}
    if k is not None:
        plan["microbatches"] = k
    env = [{"name": f"local-{i}", "address": f"{host}:{40000 + i}", "cpu_count": 2,
            "memory_total": 16 * GIB, "memory_budget": int(b * GIB), "chip": "x86_64",
            "mlx_version": "0.29", "mlx_device": "cpu", "blas": "openblas"}
           for i, b in enumerate(budgets or [8] * nodes)]
    return {"nodes": nodes, "backend": backend, "plan": plan, "environment": env,
            "memory": [], "runs": runs}


def sweep_doc(configs: list[dict], cpus_per_node: int = 1) -> dict:
    doc = {"schema": "mlx-cluster-bench/1", "created_unix": 0.0, "backend": "pipeline",
           "_source": "sweep.json", "configurations": configs, "scenarios": [],
           "workload": {"model": "smollm2-135m", "prompt_tokens": 32, "gen_tokens": 64,
                        "requests": 64, "concurrency": [1, 16, 32], "warmup": 1,
                        "strategy": "memory", "cpus_per_node": cpus_per_node}}
    assert validate_results(doc) == []
    return doc


def nodes_sweep() -> dict:
    """1, 2 and 3 pipeline nodes (2 and 3 with K=2) and mlx-ring:pipeline on 1 and 2; one
    node's c=16 was repeated three times (median 100.0); node budgets 8 GiB, the third
    node of three 4 GiB."""
    one = [sweep_run(1, 12.9, 13.4), sweep_run(16, 96.0, 6.0, 0),
           sweep_run(16, 130.0, 7.0, 1), sweep_run(16, 100.0, 6.5, 2), sweep_run(32, 138.0, 4.5)]
    return sweep_doc([
        sweep_config(1, one),
        sweep_config(2, [sweep_run(1, 12.1, 12.4), sweep_run(16, 120.0, 7.9),
                         sweep_run(32, 190.0, 6.2)], k=2),
        sweep_config(3, [sweep_run(1, 11.5, 12.0), sweep_run(3, 36.0, 12.0),
                         sweep_run(16, 150.0, 9.0), sweep_run(48, 270.0, 6.0)], k=2,
                     budgets=[8, 8, 4]),
        sweep_config(1, [sweep_run(16, 90.0, 6.0)], backend="mlx-ring:pipeline"),
        sweep_config(2, [sweep_run(16, 91.8, 5.9), sweep_run(32, 99.0, 3.3)],
                     backend="mlx-ring:pipeline"),
    ])


def section(text: str, title: str) -> str:
    return text.split(f"## {title}\n")[1].split("\n## ")[0]


def test_scaling_gives_each_node_count_its_ratio_efficiency_and_per_stream_speed():
    from console.report import render

    text = render([nodes_sweep()])
    scaling = section(text, "Scaling")
    assert ("| backend | concurrency | nodes | micro-batches (K) | aggregate tok/s | vs 1 node "
            "| efficiency (ratio / N) | per-stream tok/s (mean per request) | "
            "per-stream vs 1 node |") in scaling
    # one node's three repeats at c=16 fold into their median, 100.0 tok/s at 6.5 per stream
    assert "| pipeline | 16 | 1 | 1 | 100.0 | 1.00x | 100% | 6.5 | 1.00x |" in scaling
    assert "| pipeline | 16 | 2 | 2 | 120.0 | 1.20x | 60% | 7.9 | 1.22x |" in scaling
    assert "| pipeline | 16 | 3 | 2 | 150.0 | 1.50x | 50% | 9.0 | 1.38x |" in scaling
    assert "| pipeline | 1 | 2 | 2 | 12.1 | 0.94x | 47% | 12.4 | 0.93x |" in scaling
    assert "| mlx-ring:pipeline | 16 | 2 | 1 | 91.8 | 1.02x | 51% | 5.9 | 0.98x |" in scaling
    # a configuration with no single node of its own backend is held against the pipeline's
    assert "| mlx-ring:pipeline | 32 | 2 | 1 | 99.0 | 0.72x (vs pipeline) | 36% |" in scaling
    # no fewer nodes measured at c=48: nothing to hold it against
    assert "| pipeline | 48 | 3 | 2 | 270.0 | — | — | 6.0 | — |" in scaling
    # without a single node: against the fewest nodes, efficiency over the growth in nodes
    text2 = render([sweep_doc([sweep_config(2, [sweep_run(16, 100.0, 6.5)]),
                               sweep_config(4, [sweep_run(16, 180.0, 6.0)])])])
    assert "| pipeline | 16 | 4 | 1 | 180.0 | 1.80x (vs 2 nodes) | 90% | 6.0 | 0.92x |" in text2
    assert "## Verdict" not in text2  # a verdict is against one node
    # K shows in the configuration labels of the other tables too
    assert "| pipeline · 2 node(s) · K=2 | 16 | 7.9 | 120.0 |" in section(
        text, "Throughput per node configuration")
    assert "| pipeline · 1 node(s) | 16 |" in text


def test_files_without_micro_batches_have_no_k_column_and_no_lockstep_note():
    from console.report import render
    from console.report_scaling import LOCKSTEP_NOTE

    text = render([sweep_doc([sweep_config(1, [sweep_run(16, 100.0, 6.5)], k=None),
                              sweep_config(2, [sweep_run(16, 80.0, 5.0)], k=None)])])
    scaling = section(text, "Scaling")
    assert "| backend | concurrency | nodes | aggregate tok/s | vs 1 node |" in scaling
    assert "| pipeline | 16 | 2 | 80.0 | 0.80x | 40% | 5.0 | 0.77x |" in scaling
    assert "K=" not in text and LOCKSTEP_NOTE not in text


def test_twice_the_users_compares_n_nodes_at_n_times_c_with_one_node_at_c():
    from console.report import render

    capacity = render([nodes_sweep()]).split("### N times the users at the same speed")[1]
    capacity = capacity.split("\n## ")[0]
    rows = [line for line in capacity.splitlines() if line.startswith("| pipeline ")]
    assert rows == [
        "| pipeline | 2 | 2 | 2x the users | 32 vs 16 | 190.0 vs 100.0 | 6.2 vs 6.5 | 1.90x "
        "| 0.95x |",
        "| pipeline | 2 | 2 | the same users | 16 vs 16 | 120.0 vs 100.0 | 7.9 vs 6.5 | 1.20x "
        "| 1.22x |",
        "| pipeline | 2 | 2 | one stream | 1 vs 1 | 12.1 vs 12.9 | 12.4 vs 13.4 | 0.94x | 0.93x |",
        "| pipeline | 3 | 2 | 3x the users | 3 vs 1 | 36.0 vs 12.9 | 12.0 vs 13.4 | 2.79x "
        "| 0.90x |",
        "| pipeline | 3 | 2 | one stream | 1 vs 1 | 11.5 vs 12.9 | 12.0 vs 13.4 | 0.89x | 0.90x |",
        "| pipeline | 3 | 2 | 3x the users | 48 vs 16 | 270.0 vs 100.0 | 6.0 vs 6.5 | 2.70x "
        "| 0.92x |",
        "| pipeline | 3 | 2 | the same users | 16 vs 16 | 150.0 vs 100.0 | 9.0 vs 6.5 | 1.50x "
        "| 1.38x |",
    ]
    # mlx-ring:pipeline at 2 nodes and c=32 has no one-node run of its own at c=16: the
    # gRPC pipeline's single node stands in
    assert ("| mlx-ring:pipeline | 2 | 1 | 2x the users | 32 vs 16 | 99.0 vs 90.0 | 3.3 vs 6.0 "
            "| 1.10x | 0.55x |") in capacity
    text = render([sweep_doc([sweep_config(1, [sweep_run(16, 100.0, 6.5)]),
                              sweep_config(2, [sweep_run(16, 80.0, 5.0)])])])
    assert "No pair of N nodes at N x c and one node at c was measured" in text
    # 3 nodes at 6 serve 3 times one node at 2; 3 nodes at 4 are not 3 times any c
    text = render([sweep_doc([sweep_config(1, [sweep_run(1, 13.0, 13.0), sweep_run(2, 24.0, 12.0)]),
                              sweep_config(3, [sweep_run(4, 40.0, 10.0),
                                               sweep_run(6, 60.0, 10.0)])])])
    assert "| pipeline | 3 | 1 | 3x the users | 6 vs 2 | 60.0 vs 24.0 |" in text
    assert "4 vs 1" not in text


def test_the_report_ends_with_a_verdict_per_backend_for_the_largest_node_count():
    from console.report import render
    from console.report_scaling import LOCKSTEP_NOTE

    text = render([nodes_sweep()], ["sweep-scaling.png"])
    verdict = text.rstrip().split("\n## ")[-1].splitlines()
    assert verdict[0] == "Verdict"
    # 3 nodes, the largest; per-node concurrency scaling at the highest c (48 vs 16), not
    # 3 vs 1; memory: budgets 8 + 8 + 4 GiB against 8 (memory_total would give 3x)
    assert verdict[3] == (
        "- **pipeline**, `smollm2-135m`, 32+64 tokens, over loopback (one host, each node on "
        "its own core): 3 nodes with 2 micro-batches at concurrency 48: 2.70× the throughput "
        "of one at concurrency 16, 0.92× its per-stream speed (0.90× at concurrency 1), 2.5× "
        "its memory budget (the nodes share one host's memory).")
    assert verdict[2] == (
        "- **mlx-ring:pipeline**, `smollm2-135m`, 32+64 tokens, over loopback (one host, each "
        "node on its own core): 2 nodes at concurrency 32: 1.10× the throughput of one at "
        "concurrency 16, 0.55× its per-stream speed, 2× its memory budget (the nodes share "
        "one host's memory). " + LOCKSTEP_NOTE)
    assert len(verdict) == 4
    # and the note stands next to mlx-ring:pipeline's numbers in the scaling table
    assert f"Note: {LOCKSTEP_NOTE}" in section(text, "Scaling")


def test_the_verdict_falls_back_to_equal_concurrency_and_names_the_hosts():
    from console.report import render

    # no 2 nodes at twice one node's concurrency: the highest concurrency both measured
    one = sweep_config(1, [sweep_run(4, 30.0, 7.5), sweep_run(16, 100.0, 6.5)],
                       host="10.0.0.1", budgets=[24])
    two = sweep_config(2, [sweep_run(4, 33.0, 8.8), sweep_run(16, 180.0, 11.0)],
                       host="10.0.0.1", budgets=[24, 24])
    two["environment"][1]["address"] = "10.0.0.2:40001"
    text = render([sweep_doc([one, two], cpus_per_node=0)])
    assert text.rstrip().splitlines()[-1] == (
        "- **pipeline**, `smollm2-135m`, 32+64 tokens, over the network between 2 hosts (its "
        "speed is not in the results): 2 nodes at concurrency 16: 1.80× the throughput of "
        "one at concurrency 16, 1.69× its per-stream speed, 2× its memory budget.")
    alone = render([sweep_doc([one])])
    assert "## Verdict" not in alone and "Only one node count was measured" in alone


def test_a_sweep_report_writes_its_scaling_chart_and_names_the_lockstep_backend(tmp_path):
    pytest.importorskip("matplotlib")
    from console.report import write_report
    from console.report_scaling import LOCKSTEP_NOTE

    written = write_report([nodes_sweep()], tmp_path / "sweep.md")
    assert (tmp_path / "sweep-scaling.png").stat().st_size > 10_000
    assert tmp_path / "sweep-scaling.png" in written
    text = (tmp_path / "sweep.md").read_text()
    assert f"Note: {LOCKSTEP_NOTE}" in section(text, "Backends side by side")
    assert text.rstrip().split("\n## ")[-1].startswith("Verdict")


def test_a_plan_without_k_ran_one_micro_batch_per_node():
    from console.report_scaling import microbatches

    assert microbatches("pipeline", sweep_config(3, [], k=0)) == 3  # the default
    assert microbatches("pipeline", sweep_config(1, [], k=0)) == 1
    assert microbatches("pipeline", sweep_config(3, [], k=1)) == 1  # asked for lockstep
    assert microbatches("mlx-ring:pipeline", sweep_config(3, [], k=0)) == 1
