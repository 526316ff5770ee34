"""Automatic recovery: a peer dies mid-stream, the plan moves to the survivors, and the
client's stream goes on with exactly the tokens it would have had."""

from __future__ import annotations

import asyncio
import json
import os
import signal

import pytest

from console import ops
from protos import cluster_pb2 as pb
from tests.conftest import spawn_node
from tests.helpers import addresses, eventually, mlx_cluster

pytestmark = pytest.mark.cluster


async def test_killing_a_peer_mid_stream_fails_over_with_identical_tokens(small_cluster):
    cluster = await asyncio.to_thread(small_cluster, 3, node_args=["--no-advertise"])
    async with ops.connect(addresses(cluster)) as clients:
        plan, _ = await ops.load_plan(clients, "smollm2-135m", "", 0, "memory",
                                      progress=lambda m: None)
        request = pb.GenerateRequest(prompt="Tell me about the history of Paris.", chat=True,
                                     max_tokens=40, ignore_eos=True)
        reference = await ops.generate(clients, request)
        assert len(reference.token_ids) == 40

        got, text = [], ""
        async for event in clients[0].generate(request):
            if event.HasField("token"):
                got.append(event.token.token_id)
                text += event.token.text
                if len(got) == 12:
                    os.kill(cluster["nodes"][2]["pid"], signal.SIGKILL)
            else:
                text += event.done.tail_text
        assert got == reference.token_ids  # no gap, no duplicate, same greedy tokens
        assert text == reference.text

        info = await clients[0].info()
        assert info.plan.epoch == plan.epoch + 1
        assert [(s.start_layer, s.end_layer) for s in info.plan.shards] == [(0, 14), (15, 29)]
        (recovery,) = info.recoveries
        assert list(recovery.lost) == [cluster["nodes"][2]["node_id"]]
        assert 0 < recovery.detect_s < 3 and recovery.reload_s > 0 and recovery.first_token_s > 0
        assert not recovery.error
        # and the survivors serve new requests on the new plan
        again = await ops.generate(clients[:2], request)
        assert again.token_ids == reference.token_ids


async def test_rebalance_readmits_a_node_after_a_recovery(small_cluster, tmp_path):
    cluster = await asyncio.to_thread(small_cluster, 3, node_args=["--no-advertise"])
    addrs = addresses(cluster)
    async with ops.connect(addrs) as clients:
        await ops.load_plan(clients, "synthetic:tiny", "", 0, "memory", progress=lambda m: None)
        request = pb.GenerateRequest(prompt_ids=[256, 1, 2, 3], max_tokens=12, ignore_eos=True)
        reference = (await ops.generate(clients, request)).token_ids
        os.kill(cluster["nodes"][2]["pid"], signal.SIGKILL)

        async def recovered() -> bool:
            return len((await clients[0].info()).plan.shards) == 2

        await eventually(recovered, 10, "the plan to move to the two survivors")
        proc, ready = await asyncio.to_thread(spawn_node, tmp_path / "new.json",
                                              "--no-advertise", "--state-dir",
                                              str(tmp_path / "new"))
        try:
            nodes = ",".join([*addrs[:2], ready["address"]])
            res = await asyncio.to_thread(mlx_cluster, "rebalance", "--nodes", nodes, "--json",
                                          env=dict(os.environ))
            assert res.returncode == 0, res.stderr
            plan = json.loads(res.stdout)["plan"]
            assert len(plan["shards"]) == 3 and plan["shards"][2]["address"] == ready["address"]
            assert (await ops.generate(clients[:2], request)).token_ids == reference
        finally:
            proc.terminate()
            proc.wait(10)
