"""Micro-batches: K decode groups in flight round the ring at once (node/engine.py), on
real node processes. Each of 16 concurrent requests gets exactly the tokens it gets alone,
with K = 2 on 2 shards and K = 3 on 3, for llama, qwen3 and gemma3 (whose prompts here
outrun its sliding window); every shard ran forwards of every group; seeded sampled
requests give the same tokens with one group and with several."""

from __future__ import annotations

import asyncio

import pytest

from console import ops
from protos import cluster_pb2 as pb
from tests.helpers import addresses, generate_ids, node

pytestmark = pytest.mark.cluster

N = 16
TOKENS = 8


def prompts(window: int) -> list[list[int]]:
    """16 prompts of different lengths, some longer than a sliding window of `window`."""
    return [[256, *f"req {i} {'ab' * (i * window // 12)}".encode()] for i in range(N)]


async def load_k(addrs: list[str], model: str, k: int) -> pb.Plan:
    async with ops.connect(addrs) as clients:
        plan, _ = await ops.load_plan(clients, model, "", 0, "uniform", progress=lambda m: None,
                                      microbatches=k, auto_rejoin=False)
    return plan


async def group_forwards(address: str, k: int) -> list[int]:
    async with node(address) as client:
        snap = await client.stub.WatchMetrics(pb.WatchRequest(hz=50)).read()
    return [snap.counters[f"forward_steps:group{g}"] for g in range(k)]


@pytest.mark.parametrize("arch", ["tiny", "qwen3", "gemma3_text"])
async def test_sixteen_requests_in_k_micro_batches_get_their_tokens_alone(cluster3, arch):
    addrs = addresses(cluster3)
    model = f"synthetic:{arch}"
    window = 8 if arch == "gemma3_text" else 64  # synthetic gemma3's sliding window: 8
    ps = prompts(window)
    assert max(map(len, ps)) > window + TOKENS
    alone: list[list[int]] | None = None
    for n in (2, 3):
        plan = await load_k(addrs[:n], model, n)
        assert plan.microbatches == n and len(plan.shards) == n
        entry = plan.shards[0].address
        if alone is None:  # each request by itself (its own group, nothing beside it)
            alone = [await generate_ids(entry, p, TOKENS, ignore_eos=True) for p in ps]
            assert len({tuple(t) for t in alone}) > 1
        before = await asyncio.gather(*(group_forwards(s.address, n) for s in plan.shards))
        together = await asyncio.gather(*(generate_ids(entry, p, TOKENS, ignore_eos=True)
                                          for p in ps))
        assert together == alone, f"{n} shards, K={n}"
        after = await asyncio.gather(*(group_forwards(s.address, n) for s in plan.shards))
        for shard, b, a in zip(plan.shards, before, after):
            ran = [y - x for x, y in zip(b, a)]
            assert all(ran), (shard.address, ran)  # every group stepped on every shard


async def test_seeded_sampling_is_the_same_with_one_group_and_with_three(cluster3):
    addrs = addresses(cluster3)
    requests = [pb.GenerateRequest(prompt_ids=[256, *f"seeded {i}".encode()], max_tokens=10,
                                   ignore_eos=True, sampling=pb.SamplingParams(
                                       temperature=1.1, top_p=0.9, seed=100 + i))
                for i in range(6)]

    async def run(k: int) -> list[list[int]]:
        await load_k(addrs, "synthetic:tiny", k)
        async with node(addrs[0]) as client:
            async def one(request: pb.GenerateRequest) -> list[int]:
                return [e.token.token_id async for e in client.generate(request)
                        if e.HasField("token")]
            return list(await asyncio.gather(*(one(r) for r in requests)))

    one_group, three = await run(1), await run(3)
    assert three == one_group
    assert len({tuple(t) for t in three}) > 1
