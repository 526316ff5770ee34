"""The frames that come in on one data-plane link, whatever carries them (the Forward RPC
or the TCP link of node/datalink.py): each goes to the node's handler, in order per
request, and not too many at once.

Frames of one request are handled one after another (a shard must see its positions in
order); frames of different requests at once, so that their decode steps can share a
forward in the engine (a link handled one frame at a time would never let two requests
meet). Past `MAX_FRAMES_IN_HAND` frames in hand the link is not read, so the rest waits
on the sender's side (TCP or gRPC flow control) instead of as tasks here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Protocol

from node.errors import EpochNotLoaded, NodeError, NotLoaded
from protos import cluster_pb2 as pb

log = logging.getLogger(__name__)

MAX_FRAMES_IN_HAND = 1024  # per incoming link
MAX_FRAMES_PER_MESSAGE = 64
MAX_BATCH_BYTES = 4 * 1024 * 1024  # bigger frames (long prefill chunks) go one by one


class Replies(Protocol):
    """Where a handler answers a frame's error: back on the link it came in on."""

    def put_nowait(self, reply: pb.ForwardReply) -> None: ...


# starts handling a frame at once (a hidden state's step is queued before it returns) and
# returns what is left to wait for (the forward, the send on), if anything
FrameHandler = Callable[[pb.ForwardFrame, Replies], Awaitable[None] | None]


def unbatch(message: pb.ForwardFrame) -> list[pb.ForwardFrame]:
    """The frames a Forward message carries (itself, or its batch)."""
    return list(message.batch) if len(message.batch) else [message]


def batched(frames: list[pb.ForwardFrame]) -> list[pb.ForwardFrame]:
    """Frames sent together (the frames of one batched forward) as few messages: a message
    with a `batch` carries nothing else, and holds at most MAX_FRAMES_PER_MESSAGE frames
    of MAX_BATCH_BYTES together."""
    if len(frames) == 1:
        return frames
    messages: list[pb.ForwardFrame] = []
    batch: list[pb.ForwardFrame] = []
    size = 0
    for frame in frames:
        n = frame.ByteSize()
        if batch and (size + n > MAX_BATCH_BYTES or len(batch) == MAX_FRAMES_PER_MESSAGE):
            messages.append(batch[0] if len(batch) == 1 else pb.ForwardFrame(batch=batch))
            batch, size = [], 0
        batch.append(frame)
        size += n
    messages.append(batch[0] if len(batch) == 1 else pb.ForwardFrame(batch=batch))
    return messages


class Frames:
    """One incoming link's frames in hand. `pause(True)` is called when the link should
    stop being read, `pause(False)` when it may go on."""

    def __init__(self, handle: FrameHandler, replies: Replies,
                 pause: Callable[[bool], None]) -> None:
        self._handle = handle
        self._replies = replies
        self._pause = pause
        self._chains: dict[str, asyncio.Task] = {}  # request id -> its newest frame's task
        self._tasks: set[asyncio.Task] = set()  # every frame in hand
        self.paused = False

    def take(self, frame: pb.ForwardFrame) -> None:
        """Start handling a frame (after the frames of its request already in hand)."""
        request_id = frame.request_id
        previous = self._chains.get(request_id)
        if previous is None:
            # a frame whose request has none in hand starts here and now, in the callback
            # that read it: its step is queued without waiting for a task to be scheduled
            work = self._handle(frame, self._replies)
            if work is None:
                return  # handled whole (a token, a release, an error answered)
        else:
            work = self._after(previous, frame)
        task = asyncio.get_running_loop().create_task(work)
        self._chains[request_id] = task
        task.add_done_callback(partial(self._done, request_id))
        self._tasks.add(task)
        if len(self._tasks) >= MAX_FRAMES_IN_HAND and not self.paused:
            self.paused = True
            self._pause(True)

    async def _after(self, previous: asyncio.Task, frame: pb.ForwardFrame) -> None:
        await asyncio.wait([previous])  # its outcome was reported by itself
        work = self._handle(frame, self._replies)
        if work is not None:
            await work

    def _done(self, request_id: str, task: asyncio.Task) -> None:
        if self._chains.get(request_id) is task:
            del self._chains[request_id]
        self._tasks.discard(task)
        if self.paused and len(self._tasks) < MAX_FRAMES_IN_HAND:
            self.paused = False
            self._pause(False)

    async def finish(self) -> None:
        """Wait for the frames in hand (the link was closed by its sender)."""
        if self._tasks:
            await asyncio.wait(list(self._tasks))

    def cancel(self) -> None:
        """Drop the frames in hand (the link broke)."""
        for task in list(self._tasks):
            task.cancel()


class Intake:
    """A node's entry for frames from its upstream neighbour, whichever link carries them
    (the `FrameHandler` of every `Frames`): the node's faults first, then its plan's
    runner, which starts the frame at once (Runner.handle_frame); what is left is returned
    to be waited for, and errors are answered on the frame's link. `node` is the node's
    servicer (node/service.py): its faults, runners (`runner_for`), metrics and
    `loading`."""

    def __init__(self, node) -> None:
        self._node = node

    def __call__(self, frame: pb.ForwardFrame, replies: Replies) -> Awaitable[None] | None:
        faults = self._node.faults
        # (a node without faults skips their hooks: every frame of every token comes here)
        if faults.allowed and faults.active():
            return self._after_faults(frame, replies)
        return self._start(frame, replies)

    async def _after_faults(self, frame: pb.ForwardFrame, replies: Replies) -> None:
        try:
            kept = await self._node.faults.before_frame(frame.sender, frame.ByteSize())
        except Exception as e:
            self._reject(frame, replies, e)
            return
        work = self._start(frame, replies) if kept else None  # (dropped by loss, partition)
        if work is not None:
            await work

    def _start(self, frame: pb.ForwardFrame, replies: Replies) -> Awaitable[None] | None:
        node = self._node
        try:
            runner = node.runner_for(frame.epoch)  # a plan still draining, or the current
            if runner is None:
                if node.loading:  # mid-load: the sender should retry shortly
                    raise EpochNotLoaded(f"this node is loading epoch {frame.epoch}")
                raise NotLoaded("no shard is loaded on this node; run mlx-cluster load first")
            work = runner.handle_frame(frame, replies)
        except Exception as e:
            self._reject(frame, replies, e)
            return None
        return None if work is None else self._rest(frame, replies, work)

    async def _rest(self, frame: pb.ForwardFrame, replies: Replies,
                    work: Awaitable[None]) -> None:
        try:
            await work
        except Exception as e:
            self._reject(frame, replies, e)

    def _reject(self, frame: pb.ForwardFrame, replies: Replies, e: Exception) -> None:
        self._node.metrics.inc("frames_rejected")
        code = e.code if isinstance(e, NodeError) else "INTERNAL"
        if not isinstance(e, NodeError):
            log.exception("frame for request %s failed", frame.request_id)
        replies.put_nowait(pb.ForwardReply(request_id=frame.request_id, epoch=frame.epoch,
                                           code=code, error=str(e)))
