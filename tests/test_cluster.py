"""Real node processes on loopback: exact tokens across splits, concurrency, cleanup."""

from __future__ import annotations

import asyncio

import pytest

from console.cli import load_plan, with_clients
from console.client import NodeClient
from node.models import resolve
from node.tokenizers import prompt_tokenizer
from protos import cluster_pb2 as pb
from tests.conftest import reference_tokens

pytestmark = pytest.mark.cluster


def addresses(cluster: dict) -> list[str]:
    return [n["address"] for n in cluster["nodes"]]


async def load(addrs: list[str], model: str, strategy: str = "uniform", layers: int = 0):
    plan, shards = await with_clients(
        addrs, lambda cl: load_plan(cl, model, "", layers, strategy, progress=lambda m: None))
    return plan


async def generate_ids(address: str, prompt_ids: list[int], max_tokens: int,
                       ignore_eos: bool = False) -> list[int]:
    client = NodeClient(address)
    try:
        request = pb.GenerateRequest(prompt_ids=prompt_ids, max_tokens=max_tokens,
                                     ignore_eos=ignore_eos)
        return [e.token.token_id async for e in client.generate(request) if e.HasField("token")]
    finally:
        await client.close()


async def test_smollm2_split_10_10_10_equals_single_process(cluster3):
    addrs = addresses(cluster3)
    plan = await load(addrs, "smollm2-135m")
    assert [(s.start_layer, s.end_layer) for s in plan.shards] == [(0, 9), (10, 19), (20, 29)]
    tokenizer = prompt_tokenizer(resolve("smollm2-135m"))
    prompts = ("What is the capital of France?", "Name the largest planet in the solar system.")
    for prompt in prompts:
        ids = tokenizer.encode(prompt, chat=True)
        got = await generate_ids(addrs[0], ids, 24)
        want = reference_tokens("smollm2-135m", ids, 24)
        assert len(got) >= 4
        assert got == want, (prompt, tokenizer_decode(got), tokenizer_decode(want))


def tokenizer_decode(ids: list[int]) -> str:
    return prompt_tokenizer(resolve("smollm2-135m")).decode(ids)


async def test_synthetic_tiny_uneven_2_3_3_equals_single_process(cluster3):
    addrs = addresses(cluster3)
    plan = await load(addrs, "synthetic:tiny", "manual:0-1,2-4,5-7")
    assert [(s.start_layer, s.end_layer) for s in plan.shards] == [(0, 1), (2, 4), (5, 7)]
    for prompt in (b"hello cluster", b"a much longer prompt: " + bytes(range(40, 120))):
        ids = [256, *prompt]
        got = await generate_ids(addrs[0], ids, 32, ignore_eos=True)
        want = reference_tokens("synthetic:tiny", ids, 32, ignore_eos=True)
        assert len(got) == 32
        assert got == want


async def test_concurrent_requests_match_sequential_and_free_caches(cluster3):
    addrs = addresses(cluster3)
    await load(addrs, "synthetic:tiny", "uniform")
    prompts = [[256, *f"request number {i}".encode()] for i in range(4)]
    sequential = [await generate_ids(addrs[0], p, 16, ignore_eos=True) for p in prompts]
    concurrent = await asyncio.gather(*(generate_ids(addrs[0], p, 16, ignore_eos=True)
                                        for p in prompts))
    assert concurrent == sequential
    assert len({tuple(s) for s in sequential}) > 1  # different prompts, different outputs

    async def active(clients):
        for _ in range(50):  # release frames travel the ring asynchronously
            infos = await asyncio.gather(*(c.info() for c in clients))
            if all(i.active_requests == 0 for i in infos):
                return 0
            await asyncio.sleep(0.1)
        return sum(i.active_requests for i in infos)

    assert await with_clients(addrs, active) == 0


async def test_loading_again_replaces_the_plan_with_a_new_epoch(cluster3):
    addrs = addresses(cluster3)
    first = await load(addrs, "synthetic:tiny", "uniform")
    second = await load(addrs, "synthetic:tiny", "manual:0-3,4-5,6-7")
    assert second.epoch == first.epoch + 1

    async def shards(clients):
        return [(i.shard.start_layer, i.shard.end_layer, i.shard.epoch)
                for i in await asyncio.gather(*(c.info() for c in clients))]

    got = await with_clients(addrs, shards)
    assert got == [(0, 3, second.epoch), (4, 5, second.epoch), (6, 7, second.epoch)]
    assert len(await generate_ids(addrs[0], [256, 104, 105], 8, ignore_eos=True)) == 8
