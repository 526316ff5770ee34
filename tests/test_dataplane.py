"""The data plane's TCP link (node/datalink.py) in one process, and its use between real
nodes: the token gates it, frames keep their order per request, errors come back to the
sender, and a link that breaks fails the requests that went through it."""

from __future__ import annotations

import asyncio
import socket

import pytest

from console import ops
from console.ops import Connection
from node.auth import token_metadata
from node.datalink import HELLO, MAGIC, VERSION, DataServer, Outgoing
from node.dataplane import PeerLink
from node.metrics import NodeMetrics
from node.peers import PeerChannels
from protos import cluster_pb2 as pb
from tests.helpers import addresses, eventually

TOKEN = "data-plane-token"


class Handler:
    """Frames the data port handed over, in the order it handed them; a frame of request
    "bad" is answered with an error, one of "slow" waits a little first."""

    def __init__(self) -> None:
        self.frames: list[tuple[str, int]] = []

    async def __call__(self, frame: pb.ForwardFrame, replies) -> None:
        if frame.request_id == "slow":
            await asyncio.sleep(0.02)
        self.frames.append((frame.request_id, frame.position))
        if frame.request_id == "bad":
            replies.put_nowait(pb.ForwardReply(request_id="bad", code="INVALID_ARGUMENT",
                                               error="bad frame"))


def frame(request_id: str, position: int) -> pb.ForwardFrame:
    return pb.ForwardFrame(request_id=request_id, epoch=1, position=position,
                           tokens=pb.TokenIds(ids=[position]))


async def raw_hello(port: int, token: str) -> bytes:
    """What the data port answers a hello with `token` (then reads to the end)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    secret = token.encode()
    writer.write(HELLO.pack(MAGIC, VERSION, len(secret)) + secret)
    try:
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


async def test_the_data_port_refuses_a_link_without_the_token_and_carries_frames():
    handler, metrics = Handler(), NodeMetrics()
    server = DataServer(handler, metrics, TOKEN)
    port = await server.start("127.0.0.1")
    try:
        for wrong in ("", "not-" + TOKEN):
            answer = await raw_hello(port, wrong)  # an error, then the port closes the link
            reply = pb.ForwardReply.FromString(answer[4:])
            assert reply.code == "UNAUTHENTICATED" and "cluster token" in reply.error
            with pytest.raises(ConnectionRefusedError, match="UNAUTHENTICATED"):
                await Outgoing.connect("127.0.0.1", port, wrong, None, print,
                                       lambda link, reason: None)
        assert not handler.frames and metrics.counters["data_links_refused"] == 4

        replies: list[pb.ForwardReply] = []
        ended: list[str] = []
        link = await Outgoing.connect("127.0.0.1", port, TOKEN, None, replies.append,
                                      lambda link, reason: ended.append(reason))
        sent = [frame(r, p) for p in range(5) for r in ("slow", "fast")] + [frame("bad", 0)]
        for f in sent:
            link.send(f)
        await eventually(lambda: len(handler.frames) == len(sent), 5, "the frames to arrive")
        # in order per request; the slow request does not hold the others up
        assert [p for r, p in handler.frames if r == "slow"] == list(range(5))
        assert handler.frames.index(("fast", 4)) < handler.frames.index(("slow", 0))
        assert metrics.counters["forward_messages"] == 1  # sent in one turn: one message
        await eventually(lambda: replies, 5, "the error to come back")
        assert replies[0].request_id == "bad" and replies[0].error == "bad frame"

        # bytes that are no frame end the link, and the sender hears why
        link.transport.write(b"\x00\x00\x00\x02\xff\xff")
        await eventually(lambda: ended, 5, "the link to end")
        assert "forward stream rejected" in ended[0]
    finally:
        server.close()


async def test_a_peer_link_fails_its_requests_when_the_link_breaks_and_opens_again():
    """PeerLink over the data port of a real node would need a plan; here its link is
    opened on a data port directly (as `_connect` does after GetInfo)."""
    handler = Handler()
    server = DataServer(handler, NodeMetrics(), None)
    port = await server.start("127.0.0.1")
    broken: list[tuple[set[str], str]] = []
    peers = PeerChannels()
    link = PeerLink("127.0.0.1:1", peers, print, lambda ids, why: broken.append((ids, why)))

    async def connect():
        return await Outgoing.connect("127.0.0.1", port, None, None, print, link._lost)

    link._connect = connect  # type: ignore[method-assign]
    try:
        link.send(frame("a", 0))
        link.send(frame("b", 0))
        await eventually(lambda: len(handler.frames) == 2, 5, "frames sent while opening")
        assert link.transport == "tcp" and link.inflight == {"a", "b"}
        server.close()  # the neighbour goes away with requests in flight
        await eventually(lambda: broken, 5, "the broken link to be reported")
        assert broken[0][0] == {"a", "b"} and "unreachable" in broken[0][1]
        assert link.transport == "" and not link.inflight
        server = DataServer(handler, NodeMetrics(), None)
        port = await server.start("127.0.0.1")
        link.send(frame("c", 0))  # the next send opens a new link
        await eventually(lambda: ("c", 0) in handler.frames, 5, "the link to reopen")
        await link.close()
        link.send(pb.ForwardFrame(request_id="c", epoch=1, release=pb.Release()))  # ignored
    finally:
        server.close()
        await peers.close()


@pytest.mark.cluster
async def test_nodes_send_hidden_states_on_their_data_ports(small_cluster, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    cluster = await asyncio.to_thread(small_cluster, 2, node_args=["--token-file",
                                                                   str(token_file)])
    addrs = addresses(cluster)
    async with ops.connect(addrs, Connection(token=TOKEN)) as cl:
        await ops.load_plan(cl, "synthetic:tiny", "", 0, "uniform", progress=lambda m: None)
        request = pb.GenerateRequest(prompt_ids=[256, 65, 66], max_tokens=4, ignore_eos=True)
        assert len([e async for e in cl[0].generate(request) if e.HasField("token")]) == 4
        info = await cl[1].info()
        assert info.data_port
        counters = (await cl[1].stub.WatchMetrics(pb.WatchRequest(hz=50)).read()).counters
        assert counters["data_links"] == 1 and counters["frames_in"] >= 4
        answer = await raw_hello(info.data_port, "wrong")  # the port wants the token too
        assert pb.ForwardReply.FromString(answer[4:]).code == "UNAUTHENTICATED"
        # a link finds the data port by GetInfo; on a bare channel it takes the Forward
        # RPC instead; either way a frame's error comes back to its sender
        peers = PeerChannels()
        try:
            for way, via in (("tcp", peers), ("grpc", peers.get(addrs[1]))):
                replies: list[pb.ForwardReply] = []
                link = PeerLink(addrs[1], via, replies.append, print, token_metadata(TOKEN))
                link.send(pb.ForwardFrame(request_id=way, epoch=info.plan.epoch + 7,
                                          position=0, tokens=pb.TokenIds(ids=[1])))
                await eventually(lambda got=replies: got, 10, f"the error back by {way}")
                assert link.transport == way and replies[0].request_id == way
                assert replies[0].code == "ABORTED"  # a newer epoch than the node holds
                await link.close()
        finally:
            await peers.close()
    with socket.create_connection(("127.0.0.1", info.data_port), timeout=5):
        pass  # still listening after refusing one
