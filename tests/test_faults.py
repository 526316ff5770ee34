"""Each fault shows its effect on a real cluster, and `heal` removes it."""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager

import psutil
import pytest

from console import ops
from console.client import NodeClient
from protos import cluster_pb2 as pb
from tests.helpers import addresses, eventually

pytestmark = pytest.mark.cluster
PROMPT = [256, *b"faults"]


@asynccontextmanager
async def faulty_cluster(small_cluster, n: int = 3, model: str = "synthetic:tiny"):
    """A cluster that accepts faults, with the model loaded; the cluster and its clients."""
    cluster = await asyncio.to_thread(small_cluster, n, node_args=["--allow-faults",
                                                                   "--no-advertise"])
    async with ops.connect(addresses(cluster)) as clients:
        await ops.load_plan(clients, model, "", 0, "uniform", progress=lambda m: None)
        yield cluster, clients


async def run(client: NodeClient, n: int = 24) -> tuple[list[int], float]:
    t0 = time.perf_counter()
    request = pb.GenerateRequest(prompt_ids=PROMPT, max_tokens=n, ignore_eos=True)
    ids = [e.token.token_id async for e in client.generate(request) if e.HasField("token")]
    return ids, time.perf_counter() - t0


async def test_loss_is_retried_and_bandwidth_slows_then_heals(small_cluster):
    async with faulty_cluster(small_cluster) as (cluster, cl):
        reference, base = await run(cl[0])
        await cl[1].inject(pb.FaultSpec(kind="loss", p=0.08, seed=3))
        ids, _ = await run(cl[0], 24)
        assert ids == reference  # lost frames were noticed and the request replayed
        metrics = await cl[0].metrics()
        assert metrics.requests_retried >= 1  # the loss cost at least one replay
        await cl[1].heal()
        await cl[2].inject(pb.FaultSpec(kind="bandwidth", kbps=50))
        ids, slowed = await run(cl[0])
        # ~24 frames of ~300 bytes (64 floats + framing) at 50 kbit/s: ~1.1 s more
        assert ids == reference and slowed > base + 0.5
        await cl[2].heal()
        assert not (await cl[2].info()).faults


async def test_partition_makes_the_peer_suspect_and_the_plan_moves(small_cluster):
    async with faulty_cluster(small_cluster) as (cluster, cl):
        reference, _ = await run(cl[0])
        victim = await cl[2].info()
        first = await cl[0].info()
        # node 2 stops hearing node 0: heartbeats from the coordinator go unanswered
        await cl[2].inject(pb.FaultSpec(kind="partition", peers=[first.node_id],
                                        direction="from"))

        async def recovered() -> pb.NodeInfo | None:
            info = await cl[0].info()
            return info if info.recoveries else None

        info = await eventually(recovered, 10, "the plan to move off the partitioned node")
        (recovery,) = info.recoveries
        assert list(recovery.lost) == [victim.node_id] and recovery.detect_s < 2
        survivor = await cl[1].info()
        assert [s.node_id for s in info.plan.shards] == [first.node_id, survivor.node_id]
        assert (await run(cl[0]))[0] == reference
        await cl[2].heal()


async def test_hang_is_detected_and_served_around(small_cluster):
    async with faulty_cluster(small_cluster) as (cluster, cl):
        reference, _ = await run(cl[0])
        await cl[1].inject(pb.FaultSpec(kind="hang", duration_s=20))
        ids, _ = await run(cl[0])
        assert ids == reference
        info = await cl[0].info()
        lost = cluster["nodes"][1]["node_id"]
        assert info.recoveries and list(info.recoveries[-1].lost) == [lost]
        assert len(info.plan.shards) == 2
        await cl[1].heal()
        assert (await cl[1].info()).node_id  # answers again once healed


async def test_memory_pressure_shows_in_status_and_slow_compute_heals(small_cluster):
    async with faulty_cluster(small_cluster, n=2) as (cluster, cl):
        before = (await cl[1].info()).rss_bytes
        await cl[1].inject(pb.FaultSpec(kind="memory-pressure", gib=0.25))
        during = (await cl[1].info()).rss_bytes
        assert during - before > 0.2 * 2**30
        await cl[1].heal()
        after = psutil.Process(cluster["nodes"][1]["pid"]).memory_info().rss
        assert during - after > 0.2 * 2**30
        _, base = await run(cl[0])
        await cl[0].inject(pb.FaultSpec(kind="slow-compute", factor=6))
        _, slow = await run(cl[0])
        assert slow > 2 * base
        await cl[0].heal()
