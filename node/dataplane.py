"""The pipeline's transport: the Forward stream out to the next shard (`PeerLink`) and the
handling of the Forward streams that come in (`serve_forward`).

Frames of one request travel in order on one stream; frames of different requests
interleave freely. What queues up while a message is being written goes as one message
(`batch`), so the frames of one batched forward cost one write and one read.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc

from node.metrics import NodeMetrics
from protos import cluster_pb2 as pb
from protos import cluster_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

MAX_FRAMES_PER_MESSAGE = 64
MAX_BATCH_BYTES = 4 * 1024 * 1024  # bigger frames (long prefill chunks) go one by one
MAX_FRAMES_IN_HAND = 1024  # per incoming Forward stream


def _message(frames: list[pb.ForwardFrame]) -> pb.ForwardFrame:
    return frames[0] if len(frames) == 1 else pb.ForwardFrame(batch=frames)


def unbatch(message: pb.ForwardFrame) -> list[pb.ForwardFrame]:
    """The frames a Forward message carries (itself, or its batch)."""
    return list(message.batch) if len(message.batch) else [message]


class PeerLink:
    """The outgoing Forward stream to one neighbour, opened on first use on the node's
    channel to it (node/peers.py).

    A broken stream fails every request that went through it (via `on_broken`) and is
    reopened by the next send, so a neighbour that restarts is picked up again.
    """

    def __init__(self, address: str, channel: grpc.aio.Channel,
                 on_reply: Callable[[pb.ForwardReply], None],
                 on_broken: Callable[[set[str], str], None],
                 metadata: tuple[tuple[str, str], ...] = ()) -> None:
        self.address = address
        self._channel = channel
        self._on_reply = on_reply
        self._on_broken = on_broken
        self._metadata = metadata
        self._queue: asyncio.Queue[pb.ForwardFrame | None] | None = None
        self._call: grpc.aio.StreamStreamCall | None = None
        self._reader: asyncio.Task | None = None
        self._closed = False
        self.inflight: set[str] = set()

    def send(self, frame: pb.ForwardFrame) -> None:
        from node.errors import StaleEpoch

        is_release = frame.WhichOneof("payload") == "release"
        if is_release:
            self.inflight.discard(frame.request_id)
        if self._closed:
            if is_release:
                return  # the plan is gone; the peer drops the caches with it
            raise StaleEpoch("the plan (epoch) this request ran on was replaced or unloaded")
        if self._queue is None:
            self._open()
        assert self._queue is not None
        if not is_release:
            self.inflight.add(frame.request_id)
        self._queue.put_nowait(frame)

    def _open(self) -> None:
        queue: asyncio.Queue[pb.ForwardFrame | None] = asyncio.Queue()

        async def frames() -> AsyncIterator[pb.ForwardFrame]:
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

        stub = pb_grpc.NodeServiceStub(self._channel)
        call = stub.Forward(frames(), metadata=self._metadata)
        self._queue, self._call = queue, call
        self._reader = asyncio.get_running_loop().create_task(self._read(call, queue))

    async def _read(self, call: grpc.aio.StreamStreamCall, queue: asyncio.Queue) -> None:
        reason = "stream closed by the peer"
        try:
            async for reply in call:
                self._on_reply(reply)
        except grpc.aio.AioRpcError as e:
            reason = f"{e.code().name}: {e.details()}"
        except asyncio.CancelledError:
            return
        except Exception as e:  # anything else must not leave a dead queue behind
            log.exception("forward stream to %s failed", self.address)
            reason = repr(e)
        if self._queue is queue:  # not closed on purpose: report and reopen on next send
            self._queue = None
            broken, self.inflight = self.inflight, set()
            self._on_broken(broken, f"next shard at {self.address} unreachable ({reason})")

    async def close(self) -> None:
        """End the stream: the frames already queued (releases) go first, for at most half a
        second. The channel is the node's and stays open."""
        self._closed = True
        queue, self._queue = self._queue, None
        if queue is not None:
            queue.put_nowait(None)
        if self._reader is not None:
            await asyncio.wait([self._reader], timeout=0.5)
            self._reader.cancel()
        if self._call is not None:
            self._call.cancel()


async def serve_forward(messages: AsyncIterator[pb.ForwardFrame],
                        handle: Callable[[pb.ForwardFrame, asyncio.Queue], Awaitable[None]],
                        metrics: NodeMetrics, broken: list[str]) -> AsyncIterator[pb.ForwardReply]:
    """An incoming Forward stream: each frame goes to `handle` (which answers errors on
    the replies queue); the replies are yielded. Frames of one request are handled in
    order; frames of different requests at once, so that their decode steps can share a
    forward in the engine (a stream handled one frame at a time would never let two
    requests meet). A stream that breaks adds its reason to `broken`."""
    replies: asyncio.Queue[pb.ForwardReply | None] = asyncio.Queue()
    chains: dict[str, asyncio.Task] = {}  # request id -> its newest frame's task
    loop = asyncio.get_running_loop()
    # backpressure: past this many frames in hand the stream is not read, so the frames
    # wait on the sender's side (gRPC flow control) instead of as tasks here
    room = asyncio.Semaphore(MAX_FRAMES_IN_HAND)

    async def after(previous: asyncio.Task | None, frame: pb.ForwardFrame) -> None:
        try:
            if previous is not None:
                await asyncio.wait([previous])  # its outcome was reported by itself
            await handle(frame, replies)
        finally:
            room.release()

    def forget(request_id: str, task: asyncio.Task) -> None:
        if chains.get(request_id) is task:
            del chains[request_id]

    async def read() -> None:
        try:
            async for message in messages:
                metrics.inc("forward_messages")
                for frame in unbatch(message):
                    await room.acquire()
                    task = loop.create_task(after(chains.get(frame.request_id), frame))
                    chains[frame.request_id] = task
                    task.add_done_callback(lambda t, r=frame.request_id: forget(r, t))
            if chains:  # the upstream closed the stream: let its frames finish
                await asyncio.wait(list(chains.values()))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the stream itself broke (peer gone, undecodable bytes)
            log.info("forward stream ended: %r", e)
            broken.append(repr(e))
        finally:
            for task in chains.values():
                task.cancel()
            replies.put_nowait(None)

    reader = loop.create_task(read())
    try:
        while (reply := await replies.get()) is not None:
            yield reply
    finally:
        reader.cancel()
