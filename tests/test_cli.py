"""The commands a user types, run as subprocesses against a real local cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import psutil
import pytest

from tests.helpers import ROOT, mlx_cluster

pytestmark = pytest.mark.cluster


def test_local_up_load_generate_paris_then_down(tmp_path):
    env = dict(os.environ, MLX_CLUSTER=str(tmp_path / "cluster.json"))
    up = mlx_cluster("local", "up", "-n", "3", "--json", env=env)
    assert up.returncode == 0, up.stderr
    pids = [n["pid"] for n in json.loads(up.stdout)["nodes"]]
    try:
        assert len(pids) == 3 and all(psutil.pid_exists(p) for p in pids)
        status = mlx_cluster("status", "--json", env=env)
        assert status.returncode == 0, status.stderr
        assert [n["up"] for n in json.loads(status.stdout)["nodes"]] == [True] * 3

        load = mlx_cluster("load", "--model", "smollm2-135m", "--json", env=env)
        assert load.returncode == 0, load.stderr
        shards = json.loads(load.stdout)["plan"]["shards"]
        # balanced by default: the last node's 5 layers and the head weigh as 12 or 13 layers
        assert [(s["start_layer"], s["end_layer"]) for s in shards] == [(0, 11), (12, 24),
                                                                        (25, 29)]

        gen = mlx_cluster("generate", "--chat", "--prompt", "What is the capital of France?",
                          "--json", env=env)
        assert gen.returncode == 0, gen.stderr
        result = json.loads(gen.stdout)
        assert "Paris" in result["text"]
        assert result["tokens_per_s"] > 0 and result["ttft_s"] > 0
        assert len(result["token_ids"]) == result["completion_tokens"]
        assert [(s["start_layer"], s["end_layer"]) for s in result["shards"]] == [
            (0, 11), (12, 24), (25, 29)]
    finally:
        down = mlx_cluster("local", "down", "--json", env=env)
    assert down.returncode == 0, down.stderr
    assert len(json.loads(down.stdout)["stopped"]) == 3
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not (tmp_path / "cluster.json").exists()


def test_errors_are_messages_with_exit_codes(tmp_path):
    env = dict(os.environ, MLX_CLUSTER=str(tmp_path / "none.json"))
    res = mlx_cluster("generate", "--prompt", "hi", env=env)
    assert res.returncode == 1
    assert "local up" in res.stderr and "Traceback" not in res.stderr
    res = mlx_cluster("status", "--nodes", "127.0.0.1:1", "--json", env=env)
    assert res.returncode == 1
    assert json.loads(res.stdout)["nodes"][0]["up"] is False
    res = mlx_cluster("load", "--model", "x", "--bogus", env=env)
    assert res.returncode == 2


def test_help_teaches_a_first_session():
    res = subprocess.run([sys.executable, "-m", "console.cli", "--help"], capture_output=True,
                         text=True, cwd=ROOT)
    assert res.returncode == 0
    for word in ("local up", "load --model smollm2-135m", "generate", "local down"):
        assert word in res.stdout


def test_models_lists_every_architecture_spec():
    res = mlx_cluster("models", "--json", env=dict(os.environ))
    assert res.returncode == 0, res.stderr
    specs = {m["spec"]: m["description"] for m in json.loads(res.stdout)}
    from node.synthetic import TINY_ARCHS

    for arch in TINY_ARCHS:
        assert f"synthetic:{arch}" in specs
    assert "sliding window" in specs["synthetic:gemma3_text"]
    assert "experts" in specs["synthetic:qwen3-30b-a3b"]
