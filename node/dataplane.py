"""The pipeline's transport: the link out to the next shard (`PeerLink`) and the Forward
streams that come in by gRPC (`serve_forward`).

A link carries frames on the neighbour's data port (node/datalink.py: length-prefixed
protobuf on one TCP connection), or, when the neighbour has none, on a Forward stream.
Either way frames of one request travel in order on one connection; frames of different
requests interleave freely, and the frames of one batched forward leave in one write.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

import grpc

from node.auth import TOKEN_METADATA_KEY
from node.datalink import Outgoing
from node.frames import (
    MAX_BATCH_BYTES,
    MAX_FRAMES_PER_MESSAGE,
    FrameHandler,
    Frames,
    unbatch,
)
from node.metrics import NodeMetrics
from node.peers import PeerChannels
from protos import cluster_pb2 as pb
from protos import cluster_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0  # asking the neighbour for its data port, and connecting to it


class PeerLink:
    """The outgoing link to one neighbour, opened on first use: its data port, learnt from
    its GetInfo on the node's channel to it (node/peers.py), or else a Forward stream on
    that channel. `peers` is the node's PeerChannels; a bare channel gives a Forward stream
    only (it does not say which TLS the data port would need).

    A broken link fails every request that went through it (via `on_broken`) and is
    reopened by the next send, so a neighbour that restarts is picked up again.
    """

    def __init__(self, address: str, peers: PeerChannels | grpc.aio.Channel,
                 on_reply: Callable[[pb.ForwardReply], None],
                 on_broken: Callable[[set[str], str], None],
                 metadata: tuple[tuple[str, str], ...] = ()) -> None:
        self.address = address
        if isinstance(peers, PeerChannels):
            self._channel, self._peers = peers.get(address), peers
        else:
            self._channel, self._peers = peers, None
        self._on_reply = on_reply
        self._on_broken = on_broken
        self._metadata = metadata
        self._token = dict(metadata).get(TOKEN_METADATA_KEY)
        self._link: _Opening | Outgoing | _ForwardStream | None = None
        self._closed = False
        self.inflight: set[str] = set()

    @property
    def transport(self) -> str:
        """"tcp" (the data port), "grpc" (a Forward stream), or "" (not open)."""
        link = self._link
        return ("tcp" if isinstance(link, Outgoing) else
                "grpc" if isinstance(link, _ForwardStream) else "")

    def send(self, frame: pb.ForwardFrame) -> None:
        from node.errors import StaleEpoch

        is_release = frame.WhichOneof("payload") == "release"
        if is_release:
            self.inflight.discard(frame.request_id)
        if self._closed:
            if is_release:
                return  # the plan is gone; the peer drops the caches with it
            raise StaleEpoch("the plan (epoch) this request ran on was replaced or unloaded")
        if not is_release:
            self.inflight.add(frame.request_id)
        link = self._link
        if link is None:
            link = self._link = _Opening()
            link.task = asyncio.get_running_loop().create_task(self._establish(link))
        link.send(frame)

    async def _establish(self, opening: _Opening) -> None:
        """Connect, then pass on what was sent meanwhile."""
        try:
            link = await self._connect()
        except asyncio.CancelledError:
            return  # closed meanwhile
        except Exception as e:  # unreachable, refused, no answer: the requests fail
            reason = f"{type(e).__name__}: {e}" if str(e) else repr(e)
            if isinstance(e, grpc.aio.AioRpcError):
                reason = f"{e.code().name}: {e.details()}"
            self._lost(opening, reason)
            return
        if self._link is not opening:  # closed while connecting
            link.close()
            return
        self._link = link
        for frame in opening.frames:
            link.send(frame)

    async def _connect(self) -> Outgoing | _ForwardStream:
        port = 0
        if self._peers is not None:
            stub = pb_grpc.NodeServiceStub(self._channel)
            info = await stub.GetInfo(pb.InfoRequest(), timeout=CONNECT_TIMEOUT_S,
                                      metadata=self._metadata)
            port = info.data_port
        if not port:
            return _ForwardStream(self.address, self._channel, self._metadata,
                                  self._on_reply, self._lost)
        assert self._peers is not None
        host = self.address.rsplit(":", 1)[0].strip("[]")
        return await Outgoing.connect(host, port, self._token, self._peers.data_tls(),
                                      self._on_reply, self._lost, CONNECT_TIMEOUT_S)

    def _lost(self, link: object, reason: str) -> None:
        """A link ended without being closed here: fail what went through it."""
        if self._link is not link:
            return  # an old one (closed on purpose, or already replaced)
        self._link = None
        broken, self.inflight = self.inflight, set()
        self._on_broken(broken, f"next shard at {self.address} unreachable ({reason})")

    async def close(self) -> None:
        """End the link: the frames already sent (releases) go first. The channel is the
        node's and stays open."""
        self._closed = True
        link, self._link = self._link, None
        if isinstance(link, _ForwardStream):
            await link.aclose()
        elif link is not None:
            link.close()
            if isinstance(link, Outgoing):  # for at most half a second, as a stream's end
                await link.wait_closed(0.5)


class _Opening:
    """A link being opened: what is sent meanwhile waits here."""

    def __init__(self) -> None:
        self.frames: list[pb.ForwardFrame] = []
        self.task: asyncio.Task | None = None

    def send(self, frame: pb.ForwardFrame) -> None:
        self.frames.append(frame)

    def close(self) -> None:
        if self.task is not None:
            self.task.cancel()


def _message(frames: list[pb.ForwardFrame]) -> pb.ForwardFrame:
    return frames[0] if len(frames) == 1 else pb.ForwardFrame(batch=frames)


class _ForwardStream:
    """A link on the Forward RPC (a neighbour without a data port). What queues up while
    a message is being written goes as one message (`batch`)."""

    def __init__(self, address: str, channel: grpc.aio.Channel,
                 metadata: tuple[tuple[str, str], ...],
                 on_reply: Callable[[pb.ForwardReply], None],
                 on_end: Callable[[object, str], None]) -> None:
        self.address = address
        self._on_reply = on_reply
        self._on_end = on_end
        self._queue: asyncio.Queue[pb.ForwardFrame | None] = asyncio.Queue()
        stub = pb_grpc.NodeServiceStub(channel)
        self._call = stub.Forward(self._frames(), metadata=metadata)
        self._reader = asyncio.get_running_loop().create_task(self._read())
        self._closing = False

    def send(self, frame: pb.ForwardFrame) -> None:
        self._queue.put_nowait(frame)

    async def _frames(self) -> AsyncIterator[pb.ForwardFrame]:
        queue = self._queue
        held: pb.ForwardFrame | None = None  # taken, but too big to join the batch
        while True:
            frame = held if held is not None else await queue.get()
            if frame is None:
                return
            batch, size, held = [frame], frame.ByteSize(), None
            while not queue.empty() and len(batch) < MAX_FRAMES_PER_MESSAGE:
                more = queue.get_nowait()
                if more is None:  # closing
                    yield _message(batch)
                    return
                size += more.ByteSize()
                if size > MAX_BATCH_BYTES:
                    held = more
                    break
                batch.append(more)
            yield _message(batch)

    async def _read(self) -> None:
        reason = "stream closed by the peer"
        try:
            async for reply in self._call:
                self._on_reply(reply)
        except grpc.aio.AioRpcError as e:
            reason = f"{e.code().name}: {e.details()}"
        except asyncio.CancelledError:
            return
        except Exception as e:  # anything else must not leave a dead link behind
            log.exception("forward stream to %s failed", self.address)
            reason = repr(e)
        if not self._closing:
            self._on_end(self, reason)

    def close(self) -> None:
        self._closing = True
        self._queue.put_nowait(None)
        self._call.cancel()
        self._reader.cancel()

    async def aclose(self) -> None:
        """End the stream: the frames already queued (releases) go first, for at most half
        a second."""
        self._closing = True
        self._queue.put_nowait(None)
        await asyncio.wait([self._reader], timeout=0.5)
        self._reader.cancel()
        self._call.cancel()


async def serve_forward(messages: AsyncIterator[pb.ForwardFrame], handle: FrameHandler,
                        metrics: NodeMetrics, broken: list[str]) -> AsyncIterator[pb.ForwardReply]:
    """An incoming Forward stream: each frame goes to `handle` (node/frames.py: in order
    per request, at most MAX_FRAMES_IN_HAND at once), which answers errors on the replies
    queue; the replies are yielded. A stream that breaks adds its reason to `broken`."""
    replies: asyncio.Queue[pb.ForwardReply | None] = asyncio.Queue()
    room = asyncio.Event()
    room.set()
    frames = Frames(handle, replies, lambda pause: room.clear() if pause else room.set())

    async def read() -> None:
        try:
            async for message in messages:
                metrics.inc("forward_messages")
                for frame in unbatch(message):
                    frames.take(frame)
                    if frames.paused:  # the frames wait on the sender's side meanwhile
                        await room.wait()
            await frames.finish()  # the upstream closed the stream: let its frames finish
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the stream itself broke (peer gone, undecodable bytes)
            log.info("forward stream ended: %r", e)
            broken.append(repr(e))
        finally:
            frames.cancel()
            replies.put_nowait(None)

    reader = asyncio.get_running_loop().create_task(read())
    try:
        while (reply := await replies.get()) is not None:
            yield reply
    finally:
        reader.cancel()
