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
            label = f"pipeline · {config['nodes']} node(s)"
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
