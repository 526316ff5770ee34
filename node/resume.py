"""A request that outlives its entry node: the client's side of a continuation.

Whoever sends Generate (the CLI, the HTTP API on any node, the benchmark, the dashboard)
keeps what the request has produced so far: its token ids and how many characters of
their text it has shown. When the entry node goes away mid-stream, the survivors re-plan
(node/coordinator.py) and a new node becomes the entry; the client finds it and sends the
same request again as a continuation (`resume_ids`, `resume_chars`). The new entry
replays those tokens, not sampling them again, and goes on: the stream the user sees has
no duplicated and no missing token, and a greedy or seeded request gives the same tokens
as an uninterrupted run (sampling keys come from the seed and the token's position, so a
request is given a seed before it is sent).

`entry_of` is the one rule for where Generate goes.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc

from node.runner import DEFAULT_MAX_TOKENS
from protos import cluster_pb2 as pb
from protos import cluster_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

FIND_ENTRY_S = 60.0  # how long a continuation waits for the survivors' new plan
POLL_S = 0.1
MAX_RESUMES = 3


PENDING_WAIT_S = 30.0  # how long a new request waits for a plan that is on its way


class NoEntry(Exception):
    """No node serves the plan's first shard (yet): the message says what was seen."""


class Pending(NoEntry):
    """No entry node now, but one is on its way: worth waiting for (bounded)."""


class Loading(Pending):
    """A plan is being loaded (a `load`, or the survivors' new plan after a loss)."""

    def __init__(self, model: str, epoch: int) -> None:
        super().__init__(f"{model} is being loaded as plan epoch {epoch}")
        self.model, self.epoch = model, epoch


class Replanning(Pending):
    """The node holding the plan's first shard is gone, and the survivors, which watch
    each other (node/coordinator.py), are about to re-plan without it."""

    def __init__(self, model: str, epoch: int) -> None:
        super().__init__(f"the entry node of plan epoch {epoch} ({model}) is gone; the "
                         "survivors are re-planning")
        self.model, self.epoch = model, epoch


def entry_of(infos: list[pb.NodeInfo]) -> pb.NodeInfo:
    """The node holding the first shard of the newest loaded plan: layer 0 of a pipeline,
    rank 0 of an mlx-ring group. Generate goes there. `infos` are the nodes that answered.

    Raises Pending (Loading, Replanning) when there is none now but one is on its way, and
    NoEntry, which says what to do, when none is coming: nothing loaded, or a recovery
    that failed."""
    loaded = [i for i in infos if i.HasField("shard")]
    loading = max(infos, key=lambda i: i.loading_epoch, default=None)
    newest = max((i.shard.epoch for i in loaded), default=0)
    if loading is not None and loading.loading_epoch > newest:
        raise Loading(loading.loading_model, loading.loading_epoch)
    failed = [r.error for i in infos for r in i.recoveries if r.error and (
        r.from_epoch >= newest)]
    if not loaded:
        raise NoEntry(f"{failed[-1]}" if failed else
                      "no model is loaded; run: mlx-cluster load --model smollm2-135m")
    held = [i for i in loaded if i.shard.epoch == newest]
    for info in held:
        if info.plan.shards and info.plan.shards[0].node_id == info.node_id:
            return info
    if failed:
        raise NoEntry(f"no node holds layer 0 of plan epoch {newest}: {failed[-1]}")
    if any(len(i.plan.shards) > 1 for i in held):  # its members watch each other
        raise Replanning(held[0].plan.model, newest)
    raise NoEntry(f"no node holds layer 0 of plan epoch {newest}; reload the model")


def with_seed(request: pb.GenerateRequest) -> pb.GenerateRequest:
    """The request with a seed, so that a continuation draws what the first entry would
    have drawn (a request without one is given a random one, once)."""
    if request.sampling.HasField("seed") or request.sampling.temperature == 0:
        return request
    seeded = pb.GenerateRequest()
    seeded.CopyFrom(request)
    seeded.sampling.seed = random.getrandbits(63)
    return seeded


def entry_moved(error: grpc.aio.AioRpcError) -> bool:
    """The node is no longer the entry: a new plan replaced the one the request ran on
    (node.errors.EntryMoved). The request goes on from the new plan's entry."""
    return error.code() == grpc.StatusCode.ABORTED


def lost_entry(error: grpc.aio.AioRpcError) -> bool:
    """The entry node went away (killed, crashed, its host gone), as opposed to refusing
    the request: worth a continuation on the survivors' new plan."""
    return error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED,
                            grpc.StatusCode.UNKNOWN) and "next shard" not in (
        error.details() or "")


async def resumable(request: pb.GenerateRequest,
                    find_entry: Callable[[set[str], bool], Awaitable[str]],
                    channel: Callable[[str], grpc.aio.Channel],
                    metadata: tuple[tuple[str, str], ...] = (),
                    on_resume: Callable[[str, int], None] | None = None,
                    find_entry_s: float = FIND_ENTRY_S) -> AsyncIterator[pb.GenerateEvent]:
    """Generate's events for `request`, across entry nodes. `find_entry(gone)` returns the
    address of the current entry node, leaving out the addresses in `gone` (raise NoEntry
    while there is none); `channel(address)` gives a channel to it. `on_resume(address,
    tokens)` is told of each continuation. Raises the last gRPC error when the request
    cannot go on.

    `find_entry(gone, again)`: `again` is set when a request lost or left its entry: the
    answer must come from a fresh look, not a cached one."""
    request = with_seed(request)
    ids: list[int] = []
    chars = 0
    gone: set[str] = set()
    resumes = 0
    try:
        address = await find_entry(gone, False)
    except Pending as e:  # a plan on its way (a load, a re-plan after a loss): wait for it
        log.info("waiting for the entry node: %s", e)
        address = await _wait_for_entry(find_entry, gone, PENDING_WAIT_S, e)
    while True:
        attempt = request
        if ids:
            attempt = pb.GenerateRequest()
            attempt.CopyFrom(request)
            attempt.resume_ids.extend(ids)
            attempt.resume_chars = chars
        call = pb_grpc.NodeServiceStub(channel(address)).Generate(attempt, metadata=metadata)
        try:
            async for event in call:
                if event.HasField("token"):
                    ids.append(event.token.token_id)
                    chars += len(event.token.text)
                yield event
            return
        except grpc.aio.AioRpcError as e:
            moved = entry_moved(e)
            if not (moved or lost_entry(e)) or resumes >= MAX_RESUMES:
                raise
            resumes += 1
            if not moved:  # gone; a node the plan moved away from may be entry again
                gone.add(address)
            log.info("entry node %s %s after %d token(s) (%s); finding the new entry",
                     address, "left by a new plan" if moved else "lost", len(ids),
                     e.code().name)
            if len(ids) >= (request.max_tokens or DEFAULT_MAX_TOKENS):
                yield pb.GenerateEvent(done=pb.GenerateDone(
                    finish_reason="length", completion_tokens=len(ids)))
                return
            address = await _wait_for_entry(find_entry, gone, find_entry_s, e)
            if on_resume is not None:
                on_resume(address, len(ids))
        finally:
            call.cancel()


async def _wait_for_entry(find_entry: Callable[[set[str], bool], Awaitable[str]],
                          gone: set[str], limit_s: float, error: Exception) -> str:
    """The entry node's address once one serves, polling for up to `limit_s`; then `error`
    (what the request failed with, or the Pending it found first), saying what was seen."""
    deadline = time.monotonic() + limit_s
    seen = str(error)
    while time.monotonic() < deadline:
        try:
            return await find_entry(gone, True)
        except Pending as e:
            seen = str(e)
        except NoEntry as e:  # nothing is coming: say so now, not after the wait
            if isinstance(error, Pending):
                raise
            seen = str(e)
        except grpc.aio.AioRpcError as e:
            seen = f"{e.code().name}: {e.details()}"
        await asyncio.sleep(POLL_S)
    if isinstance(error, Pending):
        raise NoEntry(f"{seen}; no entry node within {limit_s:.0f} s: retry shortly")
    raise error from NoEntry(f"no new entry node within {limit_s:.0f} s ({seen})")
