"""Every listed mlx-lm architecture on every backend gives mlx-lm's own tokens.

Tiny random-weight model directories of each architecture are written out as people have
them (tests/modeldirs.py); the single-process reference is `mlx_lm.load` plus
`generate_step` on that directory, in a subprocess with the nodes' BLAS, and never this
project's loader. The cluster loads the same directory on real node processes.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from console.client import ClusterError
from node.synthetic import SYNTHETIC, TINY_ARCHS
from protos import cluster_pb2 as pb
from tests.helpers import (
    ROOT,
    addresses,
    forward_counters,
    generate_ids,
    load,
    load_backend,
    mlx_cluster,
    node,
)
from tests.modeldirs import BROKEN_KINDS, write_broken_dir, write_model_dir

pytestmark = pytest.mark.cluster

PROMPT = [256, *b"parity across splits"]
N_TOKENS = 16
TENSOR_TOKENS = 6
TENSOR = {"llama", "mistral", "qwen2", "qwen3", "qwen3_moe"}  # mlx-lm has shard() for these


def mlx_lm_reference(dirs: dict[str, Path], prompt: list[int], n: int) -> dict[str, list[int]]:
    """Greedy tokens of each directory by mlx_lm.load + generate_step, all in one
    subprocess with the same BLAS as the nodes."""
    from node.blas import openblas_env

    code = ("import json, sys\n"
            "from pathlib import Path\n"
            "from tests.modeldirs import reference_tokens\n"
            "dirs, prompt, n = json.loads(sys.argv[1])\n"
            "print(json.dumps({a: reference_tokens(Path(d), prompt, n) "
            "for a, d in dirs.items()}))\n")
    arg = json.dumps([{a: str(d) for a, d in dirs.items()}, prompt, n])
    res = subprocess.run([sys.executable, "-c", code, arg], capture_output=True, text=True,
                         env=openblas_env(), cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def arch_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("archs")
    return {arch: write_model_dir(root / arch, SYNTHETIC[arch]) for arch in TINY_ARCHS}


@pytest.fixture(scope="module")
def expected(arch_dirs: dict[str, Path]) -> dict[str, list[int]]:
    return mlx_lm_reference(arch_dirs, PROMPT, N_TOKENS)


@pytest.mark.parametrize("arch", TINY_ARCHS)
async def test_every_split_and_backend_gives_mlx_lm_tokens(cluster3, arch_dirs, expected, arch):
    addrs = addresses(cluster3)
    model = str(arch_dirs[arch])
    want = expected[arch]
    assert len(want) == N_TOKENS and len(set(want)) > 2  # a reference worth comparing

    plan = await load(addrs[:2], model, "manual:0-1,2-7")  # uneven 2-way
    assert [(s.start_layer, s.end_layer) for s in plan.shards] == [(0, 1), (2, 7)]
    assert await generate_ids(addrs[0], PROMPT, N_TOKENS, ignore_eos=True) == want

    plan = await load(addrs, model, "manual:0-4,5-5,6-7")  # uneven 3-way
    assert await generate_ids(plan.shards[0].address, PROMPT, N_TOKENS, ignore_eos=True) == want

    await load_backend(addrs, model, "mlx-ring:pipeline")
    assert await generate_ids(addrs[0], PROMPT, N_TOKENS, ignore_eos=True) == want

    if arch in TENSOR:
        # fewer tokens: on a 2-core machine three tensor ranks spend ~0.7 s a token waiting
        # for each other in their all-reduces; six decode steps still cross the KV cache
        await load_backend(addrs, model, "mlx-ring:tensor")
        assert await generate_ids(addrs[0], PROMPT, TENSOR_TOKENS,
                                  ignore_eos=True) == want[:TENSOR_TOKENS]
    else:  # refused before anything loads, naming the backends that do work
        with pytest.raises(ClusterError, match="pipeline or mlx-ring:pipeline"):
            await load_backend(addrs, model, "mlx-ring:tensor")


@pytest.mark.parametrize("arch", ["gemma3_text", "qwen3_moe"])
async def test_concurrent_requests_share_forwards_and_get_their_own_tokens(cluster3, arch):
    """Several requests in flight on a non-llama model (gemma3's prompts outrun its
    sliding window): each gets exactly the tokens it gets alone, and the nodes ran
    forwards with several rows (mlx-lm's batch caches through the model's own code)."""
    addrs = addresses(cluster3)
    await load(addrs, f"synthetic:{arch}", "manual:0-2,3-5,6-7")
    prompts = [[256, *f"request {i}: {'x' * (3 * i)}".encode()] for i in range(4)]
    alone = [await generate_ids(addrs[0], p, 12, ignore_eos=True) for p in prompts]
    before = await asyncio.gather(*(forward_counters(a) for a in addrs))
    together = await asyncio.gather(*(generate_ids(addrs[0], p, 12, ignore_eos=True)
                                      for p in prompts))
    after = await asyncio.gather(*(forward_counters(a) for a in addrs))
    assert together == alone
    assert len({tuple(t) for t in alone}) > 1  # different prompts, different outputs
    for b, a in zip(before, after):
        steps, rows = a[0] - b[0], a[1] - b[1]
        assert rows > steps, (b, a)  # some forwards served several requests at once


async def test_unsplittable_and_broken_models_are_refused_before_anything_loads(
        cluster3, tmp_path):
    """A recurrent architecture and broken configs: a sentence from the console before any
    node is asked, the same sentence from a node asked directly, and the loaded plan keeps
    serving."""
    addrs = addresses(cluster3)
    plan = await load(addrs, "synthetic:qwen3", "uniform")
    served = await generate_ids(addrs[0], PROMPT, 6, ignore_eos=True)
    expected = {"bad-json": "is not valid JSON", "no-model-type": "names no model_type",
                "unknown-arch": "has no architecture 'no_such_arch'",
                "recurrent": "cannot be split by layers"}
    assert set(expected) == set(BROKEN_KINDS)
    async with node(addrs[0]) as client:
        for kind in BROKEN_KINDS:
            broken = write_broken_dir(tmp_path / kind, kind)
            res = mlx_cluster("load", "--nodes", ",".join(addrs), "--model", str(broken),
                              env=dict(os.environ))
            assert res.returncode == 1, (kind, res.stdout)
            assert expected[kind] in res.stderr, (kind, res.stderr)
            assert "Traceback" not in res.stderr and "INTERNAL" not in res.stderr
            direct = pb.Plan(model=str(broken), epoch=plan.epoch + 1, n_layers=8,
                             strategy="manual", shards=[pb.PlanShard(
                                 node_id=s.node_id, address=s.address, start_layer=s.start_layer,
                                 end_layer=s.end_layer) for s in plan.shards])
            with pytest.raises(ClusterError, match=expected[kind]) as refused:
                await client.load(direct, pb.ModelOptions())
            assert "INVALID_ARGUMENT" in str(refused.value)
        info = await client.info()
        assert (info.shard.model, info.shard.epoch) == ("synthetic:qwen3", plan.epoch)
    assert await generate_ids(addrs[0], PROMPT, 6, ignore_eos=True) == served
