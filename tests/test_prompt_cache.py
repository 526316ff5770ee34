"""The prefix cache (node/prompts.py): a request whose prompt starts with a cached one
reuses that prefix's KV on every shard, gives the tokens the whole model gives without any
cache, and no shard holds more than its byte bound.

Two real nodes (synthetic:tiny split in two). The second holds 4 layers, 3 KB of KV per
position (6 KV heads of 16 floats, keys and values), and gets a bound of 250 KB: a 60-token
prompt fits, 100 tokens do not. So the
third request finds its prefix cached on the first shard but evicted on the second, and
must be run again without reuse. Both nodes warm batch sizes 1-3 at load (as nodes on a
GPU do by default): the warm-up must leave nothing in the caches and change no token.
"""

from __future__ import annotations

import asyncio
import os
import re

from tests.conftest import reference_tokens, spawn_node
from tests.helpers import (
    eventually,
    generate_ids,
    load,
    mlx_cluster,
    node,
    node_info,
    stop_process,
)

MODEL = "synthetic:tiny"
BOUND = 250_000


def prompt(n: int) -> list[int]:
    return [(i * 37 + 11) % 250 + 3 for i in range(n)]  # byte tokenizer ids


async def test_prefix_cache_reuses_on_every_shard_gives_uncached_tokens_and_keeps_its_bound(
        tmp_path):
    first, ready_a = await asyncio.to_thread(
        spawn_node, tmp_path / "a.json", "--no-advertise", "--state-dir", str(tmp_path / "a"),
        "--warmup-batches", "1-3")
    second, ready_b = await asyncio.to_thread(
        spawn_node, tmp_path / "b.json", "--no-advertise", "--state-dir", str(tmp_path / "b"),
        "--prompt-cache-bytes", str(BOUND), "--warmup-batches", "1-3")
    try:
        addrs = [ready_a["address"], ready_b["address"]]
        await load(addrs, MODEL)
        short, longer, longest = prompt(60), prompt(100), prompt(120)

        async def caches() -> list:
            return [(await node_info(a)).shard.prompt_cache for a in addrs]

        async def run(ids: list[int], settled) -> tuple[list[int], list]:
            """Generate; then the shards' caches once the ended request's KV is cached
            (`settled`), checking the bound on the way."""
            tokens = await generate_ids(addrs[0], ids, 8, ignore_eos=True)

            async def done():
                now = await caches()
                assert now[1].max_bytes == BOUND and now[1].bytes <= BOUND, now[1]
                return now if settled(now) else None

            return tokens, await eventually(done, 10, f"the prompt of {len(ids)} cached")

        assert [(c.entries, c.bytes, c.lookups) for c in await caches()] == [(0, 0, 0)] * 2
        _, now = await run(short, lambda c: c[0].entries == c[1].entries == 1)
        assert [c.hits for c in now] == [0, 0]
        assert 0 < now[1].bytes <= BOUND  # 60 positions fit

        # its prefix (60 positions) is taken on both shards; then 100 positions do not fit
        # the second shard's bound: it evicts everything
        tokens, now = await run(longer, lambda c: c[1].entries == 0)
        assert [(c.hits, c.tokens_reused) for c in now] == [(1, 60), (1, 60)]
        assert now[1].bytes == 0 and now[0].entries == 1
        assert tokens == await asyncio.to_thread(reference_tokens, MODEL, longer, 8, True)

        # the first shard reuses 100 positions, the second has none: run again without
        # reuse, with the same tokens
        tokens, now = await run(longest, lambda c: c[0].bytes > 0 and c[1].lookups == 2)
        assert now[0].hits == 2 and now[1].hits == 1
        async with node(addrs[0]) as client:
            assert (await client.metrics()).requests_failed == 0
        assert tokens == await asyncio.to_thread(reference_tokens, MODEL, longest, 8, True)

        status = await asyncio.to_thread(mlx_cluster, "status", "--nodes", ",".join(addrs),
                                         env=dict(os.environ))
        assert status.returncode == 0, status.stderr
        lines = status.stdout.splitlines()
        assert "prefix cache 0.0 of 0.2 MiB, 0 prompt(s), hits 1/2" in lines[1], status.stdout
        assert re.search(r"prefix cache 0\.\d of [\d.]+ MiB, 1 prompt\(s\), hits 2/3", lines[0]), \
            status.stdout

        # a new plan epoch starts with an empty cache
        await load(addrs, MODEL)
        assert [c.entries for c in await caches()] == [0, 0]
    finally:
        stop_process(first)
        stop_process(second)
