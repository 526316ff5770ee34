"""Model directories as people have them, on real nodes: a 4-bit MLX-converted directory
and a sharded HF safetensors directory. Each node's resident MLX memory after load is its
plan's estimate, the tokens are mlx-lm's own, and the console never opens a weights file
(checked with strace on `plan`, `load` and `serve-api`)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, addresses, eventually_sync, generate_ids, mlx_cluster
from tests.modeldirs import write_model_dir
from tests.test_architectures import mlx_lm_reference

pytestmark = pytest.mark.cluster

# big enough that a shard's weights dwarf any fixed allocation (a few MiB per node)
CONFIG = dict(model_type="qwen3", hidden_size=512, num_hidden_layers=8, intermediate_size=2048,
              num_attention_heads=8, num_key_value_heads=4, head_dim=64, vocab_size=260,
              max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=10000.0,
              tie_word_embeddings=True)
LAYOUTS = {"mlx-4bit": dict(layout="mlx", bits=4, group_size=32, shards=3),
           "hf-sharded": dict(layout="hf", shards=3)}
PROMPT = [256, *b"real layouts"]
STRACE = shutil.which("strace")


def traced(log: Path, *args: str) -> list[str]:
    """A console command line, under strace (every file it or its children open)."""
    console = [sys.executable, "-m", "console.cli", *args]
    # --seccomp-bpf: only the traced calls stop the process (a plain strace slows every
    # system call of a Python start-up)
    return [STRACE, "-f", "--seccomp-bpf", "-qq", "-e", "trace=open,openat,openat2", "-o",
            str(log), *console] if STRACE else console


def opened_weights(log: Path) -> list[str]:
    return [line for line in log.read_text().splitlines() if ".safetensors" in line]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("layouts")
    return {name: write_model_dir(root / name, CONFIG, **kw) for name, kw in LAYOUTS.items()}


@pytest.mark.parametrize("layout", list(LAYOUTS))
async def test_each_node_holds_its_share_and_the_console_opens_no_weights(
        cluster3, dirs, layout, tmp_path):
    if STRACE is None:
        pytest.skip("strace is not installed (make test installs it when run as root)")
    addrs = addresses(cluster3)
    model = str(dirs[layout])
    env = dict(os.environ)
    nodes = ["--nodes", ",".join(addrs)]
    plan_args = ["--model", model, "--strategy", "manual:0-2,3-5,6-7", "--json"]
    assert len(list(Path(model).glob("model-*.safetensors"))) == 3

    res = subprocess.run(traced(tmp_path / "plan.trace", "plan", *nodes, *plan_args),
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr
    planned = {s["node"]: s for s in json.loads(res.stdout)["shards"]}
    res = subprocess.run(traced(tmp_path / "load.trace", "load", *nodes, *plan_args),
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr

    status = json.loads(mlx_cluster("status", *nodes, "--json", env=env).stdout)
    for node in status["nodes"]:
        estimate = planned[node["node_id"]]["param_bytes"]
        resident = node["mlx_active_bytes"]
        assert abs(resident - estimate) <= 0.10 * estimate, (layout, node["name"], resident,
                                                             estimate)
    want = mlx_lm_reference({layout: Path(model)}, PROMPT, 12)[layout]
    assert await generate_ids(addrs[0], PROMPT, 12, ignore_eos=True) == want

    # the gateway opens no model file: the entry node tokenizes
    ready = tmp_path / "api.json"
    api = subprocess.Popen(traced(tmp_path / "api.trace", "serve-api", *nodes, "--port", "0",
                                  "--ready-file", str(ready)),
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=ROOT)
    started: dict = {}

    def listening() -> bool:
        assert api.poll() is None, api.stderr.read()
        with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
            started.update(json.loads(ready.read_text()))  # (written, not yet complete)
        return bool(started)

    try:
        eventually_sync(listening, 60, "the gateway to listen")
        import aiohttp

        async with aiohttp.ClientSession() as http:
            body = {"model": model, "prompt": "real layouts", "max_tokens": 4, "temperature": 0}
            async with http.post(f"{started['url']}/v1/completions", json=body) as reply:
                assert reply.status == 200, await reply.text()
                assert (await reply.json())["usage"]["completion_tokens"] >= 1
    finally:  # the gateway's own pid (strace, its parent, waits for it to exit)
        if started:
            os.kill(started["pid"], signal.SIGTERM)
        else:
            api.kill()
        api.wait(30)
    for name in ("plan", "load", "api"):
        assert opened_weights(tmp_path / f"{name}.trace") == [], name
