"""Bad input never takes a node down: each gets a clear error, then the node serves."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import grpc
import pytest

from console import ops
from console.client import ClusterError
from node.peers import CHANNEL_OPTIONS
from protos import cluster_pb2 as pb
from protos import cluster_pb2_grpc as pb_grpc
from tests.conftest import reference_tokens
from tests.helpers import ROOT, addresses, eventually, generate_ids, load, node

pytestmark = pytest.mark.cluster

PROMPT = [256, *b"frames"]


async def forward_replies(address: str, frames: list[pb.ForwardFrame]) -> list[pb.ForwardReply]:
    """Send frames on one Forward stream and collect one reply per frame."""
    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        stub = pb_grpc.NodeServiceStub(channel)
        call = stub.Forward()
        replies = []
        for frame in frames:
            await call.write(frame)
            replies.append(await asyncio.wait_for(call.read(), 10))
        await call.done_writing()
        return replies


def activation(epoch: int, shape: list[int], dtype: str = "float32", data: bytes | None = None,
               position: int = 0, request_id: str = "evil") -> pb.ForwardFrame:
    itemsize = 2 if dtype in ("float16", "bfloat16") else 4
    count = 1
    for d in shape:
        count *= d
    if data is None:
        data = bytes(count * itemsize)
    return pb.ForwardFrame(request_id=request_id, epoch=epoch, position=position, sample=True,
                           activation=pb.Tensor(data=data, shape=shape, dtype=dtype))


async def test_malformed_forward_frames_are_rejected_then_generation_is_correct(cluster3):
    addrs = addresses(cluster3)
    plan = await load(addrs, "synthetic:tiny", "manual:0-1,2-4,5-7")
    epoch = plan.epoch
    middle = addrs[1]
    frames = [
        activation(epoch, [1, 1, 95]),                              # wrong hidden size
        activation(epoch, [1, 1, 96], dtype="float16"),             # wrong dtype
        activation(epoch, [1, 1, 96], dtype="int8"),                # unsupported dtype
        activation(epoch - 1, [1, 1, 96]),                          # stale epoch
        activation(epoch + 7, [1, 1, 96]),                          # epoch not loaded yet
        activation(epoch, [1, 1, 96], data=b"\x13\x37" * 5),        # garbage: too few bytes
        activation(epoch, [1, 1, 96], data=b"\xff" * 384),          # garbage: NaN floats
        activation(epoch, [1, 1, 96], position=5),                  # unknown request mid-way
        pb.ForwardFrame(request_id="evil", epoch=epoch),            # no payload
        pb.ForwardFrame(request_id="evil", epoch=epoch, tokens=pb.TokenIds(ids=[1])),
    ]
    replies = await forward_replies(middle, frames)
    codes = [r.code for r in replies]
    assert codes == ["INVALID_ARGUMENT", "INVALID_ARGUMENT", "INVALID_ARGUMENT",
                     "FAILED_PRECONDITION", "ABORTED", "INVALID_ARGUMENT", "INVALID_ARGUMENT",
                     "DATA_LOSS", "INVALID_ARGUMENT", "INVALID_ARGUMENT"]
    assert "expected [1, L, 96]" in replies[0].error
    assert "float32" in replies[1].error
    assert "epoch" in replies[3].error and "still holds" in replies[4].error
    assert "bytes" in replies[5].error
    assert "NaN" in replies[6].error
    assert "must start at 0" in replies[7].error
    assert all(r.request_id == "evil" for r in replies)

    # bytes that are not a protobuf message at all: the stream fails, the node does not
    async with grpc.aio.insecure_channel(middle) as channel:
        raw = channel.stream_stream("/mlxcluster.NodeService/Forward",
                                    request_serializer=lambda b: b,
                                    response_deserializer=lambda b: b)
        call = raw()
        await call.write(b"\xff\xfe\xfd not protobuf")
        await call.done_writing()
        with pytest.raises(grpc.aio.AioRpcError):
            async for _ in call:
                pass

    got = await generate_ids(addrs[0], PROMPT, 12, ignore_eos=True)
    assert got == reference_tokens("synthetic:tiny", PROMPT, 12, ignore_eos=True)


async def test_unknown_model_and_bad_ranges_are_clear_errors(cluster3):
    addrs = addresses(cluster3)
    with pytest.raises(ClusterError, match="unknown model spec 'no-such-model'"):
        await load(addrs, "no-such-model")
    with pytest.raises(ClusterError, match="unknown synthetic model"):
        await load(addrs, "synthetic:llama-99b")
    with pytest.raises(ClusterError, match="covers layers 0-9; the model has 8"):
        await load(addrs, "synthetic:tiny", "manual:0-1,2-4,5-9")

    async with node(addrs[0]) as client:
        info = await client.info()
        plan = pb.Plan(model="synthetic:tiny", epoch=1000, n_layers=8, shards=[
            pb.PlanShard(node_id=info.node_id, address=info.address, start_layer=0,
                         end_layer=40)])
        with pytest.raises(ClusterError, match="INVALID_ARGUMENT"):
            await client.load(plan, pb.ModelOptions())
        plan.shards[0].end_layer = 7
        plan.n_layers = 8
        plan.model = "nope"
        with pytest.raises(ClusterError, match="unknown model spec"):
            await client.load(plan, pb.ModelOptions())
        assert await client.healthy()
    await load(addrs, "synthetic:tiny")
    assert len(await generate_ids(addrs[0], PROMPT, 4, ignore_eos=True)) == 4


async def test_prompt_longer_than_context_and_wrong_entry_node(cluster3):
    addrs = addresses(cluster3)
    await load(addrs, "synthetic:tiny")
    with pytest.raises(ClusterError, match="OUT_OF_RANGE.*context is 2048"):
        await generate_ids(addrs[0], [65] * 2048, 4)
    with pytest.raises(ClusterError, match="outside the vocabulary"):
        await generate_ids(addrs[0], [65, 100000], 4)
    with pytest.raises(ClusterError, match=f"first shard at {addrs[0]}"):
        await generate_ids(addrs[1], PROMPT, 4)
    assert len(await generate_ids(addrs[0], PROMPT, 4, ignore_eos=True)) == 4


async def test_a_dead_peer_with_no_room_left_fails_the_request_clearly(small_cluster):
    # three nodes can hold synthetic:tiny (KV cache at 2048 tokens included); two cannot
    cluster = await asyncio.to_thread(small_cluster, 3, memory_budgets=["6.5MB"] * 3)
    addrs = addresses(cluster)
    await load(addrs, "synthetic:tiny")
    assert len(await generate_ids(addrs[0], PROMPT, 4, ignore_eos=True)) == 4
    os.kill(cluster["nodes"][2]["pid"], signal.SIGKILL)
    with pytest.raises(ClusterError, match="does not fit.*short"):  # an answer, not a hang
        await asyncio.wait_for(generate_ids(addrs[0], PROMPT, 400, ignore_eos=True), 15)
    async with node(addrs[0]) as client:
        info = await client.info()  # the node keeps serving and says what happened
        assert "does not fit" in info.recoveries[-1].error
        assert await client.healthy()


async def test_replacing_the_plan_mid_request_moves_the_request_to_the_new_plan(small_cluster):
    cluster = await asyncio.to_thread(small_cluster, 3)
    addrs = addresses(cluster)
    await load(addrs, "synthetic:tiny")
    reference = await generate_ids(addrs[0], PROMPT, 300, ignore_eos=True)
    request = pb.GenerateRequest(prompt_ids=PROMPT, max_tokens=300, ignore_eos=True)
    async with node(addrs[0]) as client:
        retried = (await client.metrics()).requests_retried
        got: list[int] = []

        async def stream() -> None:
            async for event in client.generate(request):
                if event.HasField("token"):
                    got.append(event.token.token_id)

        task = asyncio.ensure_future(stream())
        await eventually(lambda: got, 30, "the request's first token")
        # a new epoch meanwhile, loaded in place of the old plan (not beside it, where the
        # request would finish on the old plan: tests/test_reload.py)
        async with ops.connect(addrs) as clients:
            plan, _ = await ops.load_plan(clients, "synthetic:tiny", "", 0,
                                          "manual:0-3,4-5,6-7", progress=lambda m: None,
                                          stage=False)
        await asyncio.wait_for(task, 60)
        assert got == reference  # replayed on the new plan: no gap, no duplicate
        # the old plan's pipeline closed under the request, which the entry node retried
        assert (await client.metrics()).requests_retried > retried
        assert (await client.info()).plan.epoch == plan.epoch


async def test_bad_timeouts_and_a_taken_port_are_clear_errors(cluster3, tmp_path):
    addrs = addresses(cluster3)
    await load(addrs, "synthetic:tiny")
    async with node(addrs[0]) as client:
        for bad in (float("nan"), -1.0):
            request = pb.GenerateRequest(prompt_ids=PROMPT, max_tokens=4, timeout_s=bad)
            with pytest.raises(ClusterError, match="INVALID_ARGUMENT.*timeout_s"):
                async for _ in client.generate(request):
                    pass
    port = addrs[0].rsplit(":", 1)[1]
    res = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "node.cli", "serve", "--port", port,
                         "--no-advertise", "--state-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert res.returncode == 1
    assert "cannot bind" in res.stderr and "Traceback" not in res.stderr
