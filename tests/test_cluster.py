"""Real node processes on loopback: exact tokens across splits, concurrency, cleanup."""

from __future__ import annotations

import asyncio

import pytest

from console import ops
from node.models import resolve
from node.tokenizers import prompt_tokenizer
from tests.conftest import reference_tokens
from tests.helpers import addresses, eventually, generate_ids, load

pytestmark = pytest.mark.cluster


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

    async def idle(clients) -> bool:
        infos = await asyncio.gather(*(c.info() for c in clients))
        return all(i.active_requests == 0 for i in infos)

    async with ops.connect(addrs) as clients:  # release frames travel the ring asynchronously
        await eventually(lambda: idle(clients), 5, "every node to free its request caches")


async def test_loading_again_replaces_the_plan_with_a_new_epoch(cluster3):
    addrs = addresses(cluster3)
    first = await load(addrs, "synthetic:tiny", "uniform")
    second = await load(addrs, "synthetic:tiny", "manual:0-3,4-5,6-7")
    assert second.epoch == first.epoch + 1

    async with ops.connect(addrs) as clients:
        infos = await asyncio.gather(*(c.info() for c in clients))
    got = [(i.shard.start_layer, i.shard.end_layer, i.shard.epoch) for i in infos]
    assert got == [(0, 3, second.epoch), (4, 5, second.epoch), (6, 7, second.epoch)]
    assert len(await generate_ids(addrs[0], [256, 104, 105], 8, ignore_eos=True)) == 8
