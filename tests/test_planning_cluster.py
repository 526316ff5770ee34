"""Plans against real nodes with memory budgets: preview, load, resident memory, refusal."""

from __future__ import annotations

import json
import os

import pytest

from tests.helpers import mlx_cluster

pytestmark = pytest.mark.cluster


def test_plan_load_and_resident_memory_with_budgets(small_cluster, tmp_path):
    # float16 (half the bytes of float32 to make up at load): 0.4 GiB a layer
    cluster = small_cluster(3, memory_budgets=["2GiB", "1.5GiB", "1.5GiB"])
    env = dict(os.environ, MLX_CLUSTER=str(tmp_path / "cluster0.json"))
    args = ["--model", "synthetic:llama-7b", "--layers", "8", "--strategy", "memory",
            "--dtype", "float16"]

    preview = mlx_cluster("plan", *args, env=env)
    assert preview.returncode == 0, preview.stderr
    assert "LAYER MAP" in preview.stdout and "GiB" in preview.stdout
    planned = json.loads(mlx_cluster("plan", *args, "--json", env=env).stdout)
    ranges = [(s["start_layer"], s["end_layer"]) for s in planned["shards"]]
    assert ranges == [(0, 2), (3, 5), (6, 7)]
    for shard in planned["shards"]:
        assert shard["total_bytes"] <= shard["budget_bytes"]

    load = mlx_cluster("load", *args, "--json", env=env, timeout=600)
    assert load.returncode == 0, load.stderr
    status = json.loads(mlx_cluster("status", "--json", env=env).stdout)
    by_id = {n["node_id"]: n for n in status["nodes"]}
    for shard in planned["shards"]:
        node = by_id[shard["node"]]
        assert (node["shard"]["start_layer"], node["shard"]["end_layer"]) == (
            shard["start_layer"], shard["end_layer"])
        resident = node["mlx_active_bytes"]
        assert abs(resident - shard["total_bytes"]) <= 0.25 * shard["total_bytes"], (
            resident, shard)

    # the whole 13B-shaped model does not fit 5 GiB: refused before anything is loaded
    for command in ("plan", "load"):
        refused = mlx_cluster(command, "--model", "synthetic:llama-13b", env=env)
        assert refused.returncode == 1
        assert "does not fit" in refused.stderr and "GiB short" in refused.stderr
    after = json.loads(mlx_cluster("status", "--json", env=env).stdout)
    assert [n["shard"]["model"] for n in after["nodes"]] == ["synthetic:llama-7b"] * 3
    assert [n["shard"]["epoch"] for n in after["nodes"]] == [1, 1, 1]
    assert len(cluster["nodes"]) == 3


def test_a_node_refuses_a_shard_over_its_budget(small_cluster, tmp_path):
    small_cluster(2, memory_budgets=["1GiB", "8GiB"])
    env = dict(os.environ, MLX_CLUSTER=str(tmp_path / "cluster0.json"))
    res = mlx_cluster("load", "--model", "synthetic:llama-7b", "--layers", "4",
                      "--strategy", "manual:0-2,3-3", env=env)
    assert res.returncode == 1
    assert "GiB over" in res.stderr  # the planner refuses before any node is asked
