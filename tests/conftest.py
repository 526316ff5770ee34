"""Shared fixtures: an isolated cache and cluster file, and real local clusters.

Cluster fixtures start real `mlx-node serve` processes on 127.0.0.1 with free ports
(console.local), exactly as `mlx-cluster local up` does, and stop them afterwards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.helpers import ROOT, eventually_sync

# isolate everything a test run writes from the user's own cache and cluster file;
# set at import so the node processes the tests spawn inherit it
_SESSION_DIR = Path(tempfile.mkdtemp(prefix="mlx-cluster-tests-"))
os.environ.setdefault("MLX_CLUSTER_CACHE", str(_SESSION_DIR / "models"))
os.environ["MLX_CLUSTER"] = str(_SESSION_DIR / "cluster.json")
os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def session_dir() -> Path:
    return _SESSION_DIR


def start_cluster(n: int, path: Path, **kwargs) -> dict:
    from console import local

    return local.up(n, path=path, **kwargs)


@pytest.fixture(scope="session")
def cluster3(session_dir: Path):
    """Three real node processes on loopback for the whole session."""
    from console import local

    path = session_dir / "shared-cluster.json"
    cluster = start_cluster(3, path, node_args=["--no-advertise"])
    yield cluster
    local.down(path)


@pytest.fixture
def small_cluster(tmp_path: Path):
    """A fresh cluster the test may break (kill nodes); stopped afterwards."""
    from console import local

    clusters: list[Path] = []

    def make(n: int = 3, **kwargs) -> dict:
        path = tmp_path / f"cluster{len(clusters)}.json"
        clusters.append(path)
        return start_cluster(n, path, **kwargs)

    yield make
    for path in clusters:
        local.down(path)


def reference_tokens(model: str, prompt_ids: list[int], max_tokens: int,
                     ignore_eos: bool = False) -> list[int]:
    """Greedy tokens of the whole model in one process (mlx_lm.generate_step), run in a
    subprocess with the same BLAS as the nodes."""
    return reference_run(model, prompt_ids, max_tokens, ignore_eos)["token_ids"]


def reference_run(model: str, prompt_ids: list[int], max_tokens: int,
                  ignore_eos: bool = False) -> dict:
    """node.reference's result: token_ids, logprobs, timings."""
    from node.blas import openblas_env

    cmd = [sys.executable, "-m", "node.reference", "--model", model, "--prompt-ids",
           ",".join(map(str, prompt_ids)), "--max-tokens", str(max_tokens)]
    if ignore_eos:
        cmd.append("--ignore-eos")
    res = subprocess.run(cmd, capture_output=True, text=True, env=openblas_env(), cwd=ROOT,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.splitlines()[-1])


def spawn_node(ready_file: Path, *args: str, timeout_s: float = 30.0):
    """One `mlx-node serve --port 0` process; returns (Popen, ready-file dict)."""
    proc = subprocess.Popen([sys.executable, "-m", "node.cli", "serve", "--port", "0",
                             "--ready-file", str(ready_file), *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def ready() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"node exited with {proc.returncode} before it was ready: {args}")
        return ready_file.exists()

    try:
        eventually_sync(ready, timeout_s, f"a node to start with {args}")
    except BaseException:
        proc.kill()
        raise
    return proc, json.loads(ready_file.read_text())
