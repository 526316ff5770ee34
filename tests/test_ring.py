"""The mlx-ring backend: real node processes start real mx.distributed ring groups on
loopback (MLX's TCP ring backend), and the results are compared with one process."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import grpc
import pytest

from console.client import ClusterError
from node.models import resolve
from node.tokenizers import prompt_tokenizer
from protos import cluster_pb2 as pb
from protos import cluster_pb2_grpc as pb_grpc
from tests.conftest import reference_run
from tests.helpers import (
    addresses,
    eventually,
    load_backend,
    node,
    node_info,
    token_events,
    unload,
)

pytestmark = pytest.mark.cluster
TINY_PROMPT = [256, *b"the ring"]


@pytest.mark.parametrize("model", ["synthetic:tiny", "smollm2-135m"])
async def test_every_backend_gives_the_single_process_tokens(cluster3, model):
    addrs = addresses(cluster3)
    if model == "smollm2-135m":  # a factual chat prompt; 3 ranks split its 9/3 heads
        ids = prompt_tokenizer(resolve(model)).encode("What is the capital of France?", True)
        n, ignore_eos = 8, False
    else:
        ids, n, ignore_eos = TINY_PROMPT, 8, True  # each tensor token ~0.7 s here
    want = reference_run(model, ids, n, ignore_eos)
    # a seeded sampled request: the same tokens on every backend (keys from seed+position)
    seeded = pb.GenerateRequest(prompt_ids=ids, max_tokens=n, ignore_eos=True,
                                sampling=pb.SamplingParams(temperature=1.2, top_p=0.95,
                                                           seed=1234))
    sampled = {}
    try:
        for backend in ("mlx-ring:tensor", "mlx-ring:pipeline", "pipeline"):
            plan, shards = await load_backend(addrs, model, backend)
            if backend == "mlx-ring:tensor":  # every rank holds every layer, 1/3 of each
                assert [(s.start_layer, s.end_layer) for s in plan.shards] == [
                    (0, plan.n_layers - 1)] * 3
                assert [s.ring.rank for s in shards] == [0, 1, 2]
                assert all(s.ring.size == 3 and s.ring.state == "ready" for s in shards)
            events = await token_events(addrs[0], ids, n, ignore_eos)
            assert [e.token_id for e in events] == want["token_ids"], backend
            if backend.startswith("mlx-ring"):
                got = [e.logprob for e in events]
                assert max(abs(a - b) for a, b in zip(got, want["logprobs"])) < 1e-3, backend
            if model == "synthetic:tiny":
                async with node(addrs[0]) as client:
                    sampled[backend] = [e.token.token_id async for e in client.generate(seeded)
                                        if e.HasField("token")]
    finally:
        await unload(addrs)
    if sampled:
        assert sampled["pipeline"] != want["token_ids"]  # it did sample
        assert sampled["mlx-ring:pipeline"] == sampled["pipeline"]
        assert sampled["mlx-ring:tensor"] == sampled["pipeline"]


async def test_shapes_that_do_not_divide_are_refused_with_the_reason(cluster3):
    addrs = addresses(cluster3)
    with pytest.raises(ClusterError, match=r"9 attention heads and 3 KV heads do not "
                                           r"divide by 2.*works on 3"):
        await load_backend(addrs[:2], "smollm2-135m", "mlx-ring:tensor")
    with pytest.raises(ClusterError, match="unknown backend"):
        await load_backend(addrs, "synthetic:tiny", "mlx-ring:sideways")


async def test_killed_rank_is_reported_and_auto_reform_resumes_serving(small_cluster):
    cluster = await asyncio.to_thread(small_cluster, 3)
    addrs = addresses(cluster)
    plan, _ = await load_backend(addrs, "synthetic:tiny", "mlx-ring:tensor", auto_reform=True)
    before = [e.token_id for e in await token_events(addrs[0], TINY_PROMPT, 8, True)]
    killed_at = time.time()
    os.kill(cluster["nodes"][2]["pid"], signal.SIGKILL)

    async def reformed() -> pb.NodeInfo | None:
        rank0 = await node_info(addrs[0])
        return rank0 if rank0.recoveries and rank0.shard.ring.state == "ready" else None

    rank0 = await eventually(reformed, 60, "the group to re-form on two ranks", 0.05)
    record = rank0.recoveries[-1]
    assert not record.error, record.error
    assert record.at_unix - killed_at < 2.0  # declared down within 2 s of the kill
    assert record.detect_s < 2.0 and record.reload_s > 0
    assert record.backend == "mlx-ring:tensor"
    assert rank0.plan.epoch == plan.epoch + 1 and rank0.shard.ring.size == 2
    after = [e.token_id for e in await token_events(addrs[0], TINY_PROMPT, 8, True)]
    assert after == before  # the 2-rank group computes the same greedy tokens


async def test_without_auto_reform_a_lost_rank_takes_the_group_down_clearly(small_cluster):
    cluster = await asyncio.to_thread(small_cluster, 3)
    addrs = addresses(cluster)
    plan, _ = await load_backend(addrs, "synthetic:tiny", "mlx-ring:pipeline")
    assert [(s.start_layer, s.end_layer) for s in plan.shards] == [(0, 2), (3, 5), (6, 7)]
    async with grpc.aio.insecure_channel(addrs[1]) as channel:  # bad input first
        stub = pb_grpc.NodeServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.RingWake(pb.RingWakeRequest(epoch=plan.epoch + 5))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert len(await token_events(addrs[0], TINY_PROMPT, 8, True)) == 8  # still serving
    killed_at = time.time()
    os.kill(cluster["nodes"][1]["pid"], signal.SIGKILL)

    async def down() -> pb.NodeInfo | None:
        rank0 = await node_info(addrs[0])
        return rank0 if rank0.shard.ring.state == "down" else None

    rank0 = await eventually(down, 10, "rank 0 to report the group down", 0.05)
    record = rank0.recoveries[-1]
    assert record.at_unix - killed_at < 2.0  # declared down within 2 s of the kill
    assert "--auto-reform" in record.error

    async def survivor_idle() -> bool:  # its idle worker was stopped by the coordinator
        return not (await node_info(addrs[2])).HasField("shard")

    await eventually(survivor_idle, 5, "the surviving rank to drop its shard")
    with pytest.raises(ClusterError, match="group is down"):
        await token_events(addrs[0], TINY_PROMPT, 8, True)
    async with node(addrs[0]) as client:
        assert await client.healthy()  # the node itself keeps serving its API


async def test_concurrent_and_abandoned_requests_share_the_group_in_turn(cluster3):
    addrs = addresses(cluster3)
    await load_backend(addrs, "synthetic:tiny", "mlx-ring:pipeline")
    prompts = [[256, *f"prompt {i}".encode()] for i in range(3)]
    try:
        alone = [[e.token_id for e in await token_events(addrs[0], p, 12, True)]
                 for p in prompts]
        together = await asyncio.gather(*(token_events(addrs[0], p, 12, True)
                                          for p in prompts))
        assert [[e.token_id for e in events] for events in together] == alone
        # a client that goes away mid-stream: the group stops its request and serves on
        async with node(addrs[0]) as client:
            stream = client.generate(pb.GenerateRequest(prompt_ids=prompts[0], max_tokens=400,
                                                        ignore_eos=True))
            async for event in stream:
                if event.HasField("token") and event.token.index >= 2:
                    break
            await stream.aclose()
        again = await token_events(addrs[0], prompts[1], 12, True)
        assert [e.token_id for e in again] == alone[1]
        assert (await node_info(addrs[0])).active_requests == 0
    finally:
        await unload(addrs)
