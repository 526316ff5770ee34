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


def test_kill_scenario_under_load_keeps_outputs_and_reports_recovery(tmp_path):
    env = dict(os.environ, MLX_CLUSTER=str(tmp_path / "cluster.json"))
    out, report = tmp_path / "kill.json", tmp_path / "kill.md"
    res = mlx_cluster("bench", "--local", "--scenario", "kill", "--model", "synthetic:tiny",
                      "--prompt-tokens", "16", "--gen-tokens", "8", "--requests", "200",
                      "--concurrency", "4", "--out", str(out), env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    (scenario,) = json.loads(out.read_text())["scenarios"]
    assert scenario["requests"] == 200 and scenario["success_rate"] >= 0.995
    assert scenario["outputs_correct"] is True
    assert scenario["correct_outputs"] >= 199
    (recovery,) = scenario["recoveries"]
    assert recovery["to_epoch"] == recovery["from_epoch"] + 1 and not recovery["error"]
    assert 0 < scenario["detect_s"] < 3 and scenario["recover_s"] >= scenario["detect_s"]
    res = mlx_cluster("report", str(out), "-o", str(report), env=env)
    assert res.returncode == 0, res.stderr
    text = report.read_text()
    assert "## Fault recovery" in text
    assert (f"| kill | {scenario['node']} | 200 @ c=4 | {scenario['success_rate']:.2%} | "
            f"{scenario['detect_s'] * 1000:.1f} | {scenario['recover_s'] * 1000:.1f} |") in text
