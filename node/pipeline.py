"""The gRPC pipeline backend: activations flow shard to shard, tokens come back round.

Each node keeps one long-lived link to the next shard of the plan (the last shard's
"next" is the first shard, which closes the ring; node/dataplane.py): a TCP connection to
the neighbour's data port (node/datalink.py), or its `Forward` RPC where it has none. The first
shard owns the requests: it tokenises, runs its layers, and sends hidden states on; the
last shard samples and sends the token back to the first, which streams it to the client
and feeds it in again. Frames for one request travel in order on one stream, so each
shard sees positions in order; frames of different requests interleave freely.

Micro-batches: the first shard puts each request in one of K decode groups (the plan's
`microbatches`; 0, the default: one per shard; 1: one batch in lockstep) and every frame
of the request carries its group, so that K groups circulate the ring at once and each
shard computes one while the others travel (node/engine.py). A new request joins the
group with the fewest requests; when a request ends and the groups differ by more than
one, a request of the largest group moves to the smallest with its next step.

Errors travel backwards: a shard that rejects a frame answers on the link the frame
came in on; the sender passes it on to its own upstream until it reaches the first
shard, which fails the request. Every request's caches are freed by a `release` frame
that follows the request round the ring when it ends, however it ends.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable

import grpc

from node.batch import StepResult
from node.dataplane import PeerLink
from node.engine import Engine
from node.errors import (
    BadFrame,
    EpochNotLoaded,
    NodeError,
    NotLoaded,
    PeerUnavailable,
    StaleEpoch,
)
from node.faults import FaultBook
from node.metrics import NodeMetrics
from node.peers import PeerChannels
from node.runner import sampling_of, serve_request
from protos import cluster_pb2 as pb

log = logging.getLogger(__name__)


def microbatches_of(plan: pb.Plan) -> int:
    """Decode groups in flight for a pipeline plan: its `microbatches`, or one per shard
    when it says 0 (so a re-plan onto fewer nodes keeps one per shard); one shard alone
    has nobody to overlap with: 1."""
    if len(plan.shards) < 2:
        return 1
    return plan.microbatches or len(plan.shards)

PREFILL_STEP = 2048  # prompt positions per step, as mlx_lm.generate_step's prefill_step_size


class Pipeline:
    """This node's place in one plan (epoch): its engine, its link, its requests. A
    `Runner` (node/runner.py); on the first shard also the `Backend` of its requests."""

    patient_first_token = False  # requests run at once, side by side

    def __init__(self, node_id: str, plan: pb.Plan, engine: Engine, metrics: NodeMetrics,
                 peers: PeerChannels, request_timeout_s: float = 120.0,
                 metadata: tuple[tuple[str, str], ...] = (),
                 faults: FaultBook | None = None) -> None:
        self.plan = plan
        self.faults = faults or FaultBook(allowed=False)
        self.epoch = plan.epoch
        self.engine = engine
        self.shard = engine.shard
        self.tokenizer = engine.shard.tokenizer
        self.source = engine.shard.source
        self.metrics = metrics
        self.request_timeout_s = request_timeout_s
        self.node_id = node_id
        ids = [s.node_id for s in plan.shards]
        self.index = ids.index(node_id)
        self.entry_address = plan.shards[0].address
        self.is_first = self.index == 0
        self.is_last = self.index == len(plan.shards) - 1
        self.link: PeerLink | None = None
        self.next_id = ""
        if len(plan.shards) > 1:
            nxt = plan.shards[(self.index + 1) % len(plan.shards)]
            self.next_id = nxt.node_id
            self.link = PeerLink(nxt.address, peers, self._on_reply, self._on_broken,
                                 metadata)
        self.pending: dict[str, asyncio.Queue] = {}  # first shard: requests it owns
        # first shard: each request's micro-batch (decode group), 0..microbatches-1
        self.microbatches = microbatches_of(plan)
        self.group_of: dict[str, int] = {}
        self._routes: dict[str, asyncio.Queue] = {}  # where to send errors back for a request

    # ------------------------------------------------------------ Runner

    @property
    def active_requests(self) -> int:
        return self.engine.active_requests

    @property
    def state(self) -> str:
        return "serving" if self.active_requests else "ready"

    held_bytes = 0  # the weights are in this process

    @property
    def busy_s(self) -> float:
        """Seconds this shard has spent computing forwards."""
        return self.engine.busy_s

    @property
    def microbatches_busy(self) -> int:
        """Decode groups holding requests on this shard now."""
        return self.engine.batch.busy_groups()

    def shard_info(self) -> pb.ShardInfo:
        s = self.shard
        return pb.ShardInfo(model=s.source.spec, start_layer=s.start, end_layer=s.end,
                            n_layers=s.n_layers, epoch=self.epoch, dtype=s.dtype,
                            form=s.source.form or s.dtype, weight_bytes=s.weight_bytes,
                            context_length=s.source.context_length, load_seconds=s.load_seconds,
                            prompt_cache=self.engine.batch.prompts.info())

    def free_idle(self, max_idle_s: float) -> list[str]:
        return self.engine.free_idle(max_idle_s)

    def wake(self) -> None:
        raise NotLoaded("this node holds no mlx-ring plan")

    def mark_down(self, reason: str) -> None:
        for queue in self.pending.values():
            queue.put_nowait(PeerUnavailable(f"request aborted: {reason}"))

    async def close(self, reason: str = "the plan was replaced") -> None:
        self.engine.drop_prompts()  # a new plan (or none) starts with an empty cache
        for queue in self.pending.values():
            queue.put_nowait(StaleEpoch(f"request aborted: {reason}"))
        if self.link is not None:
            await self.link.close()

    # ------------------------------------------------------------ errors, backwards

    def _on_reply(self, reply: pb.ForwardReply) -> None:
        self.report_error(reply.request_id, reply.code, reply.error)

    def _on_broken(self, request_ids: set[str], reason: str) -> None:
        for request_id in request_ids:
            self.report_error(request_id, PeerUnavailable.code, reason)

    def report_error(self, request_id: str, code: str, message: str) -> None:
        """Fail a request here if we own it, else pass the error to its upstream."""
        self.metrics.inc("errors")
        if request_id in self.pending:
            error = NodeError(message)
            error.code = code if code in grpc.StatusCode.__members__ else "INTERNAL"
            self.pending[request_id].put_nowait(error)
        elif request_id in self._routes:
            self._routes[request_id].put_nowait(
                pb.ForwardReply(request_id=request_id, epoch=self.epoch, code=code, error=message))
        else:
            log.info("error for finished or unknown request %s: %s %s", request_id, code, message)

    # ------------------------------------------------------------ frames in

    def handle_frame(self, frame: pb.ForwardFrame,
                     replies: asyncio.Queue) -> Awaitable[None] | None:
        """Act on one frame from the upstream neighbour, at once: a hidden state's step is
        queued before this returns, and the rest (its forward, the send on) is returned
        to be waited for. Raise NodeError to reject it."""
        self.metrics.inc("frames_in")
        self.metrics.inc("bytes_in", frame.ByteSize())
        if frame.sent_unix_ns:
            hop = max(0.0, (time.time_ns() - frame.sent_unix_ns) / 1e9)
            self.metrics.observe("hop", hop)
            if frame.sender:
                self.metrics.observe(f"hop:{frame.sender}", hop)
        if not frame.request_id:
            raise BadFrame("frame without request_id")
        if frame.epoch > self.epoch:
            raise EpochNotLoaded(f"frame for plan epoch {frame.epoch}, but this node still "
                                 f"holds epoch {self.epoch} (loading?)")
        if frame.epoch != self.epoch:
            raise StaleEpoch(f"frame for plan epoch {frame.epoch}, but this node holds epoch "
                             f"{self.epoch}; reload the plan (mlx-cluster load)")
        kind = frame.WhichOneof("payload")
        if kind == "release":
            self._release(frame.request_id, frame.release.reason, forward=not self.is_last)
        elif kind == "tokens":
            self._take_tokens(frame)
        elif kind == "activation":
            return self._take_activation(frame, replies)
        else:
            raise BadFrame("frame without payload (activation, tokens or release)")
        return None

    def _take_tokens(self, frame: pb.ForwardFrame) -> None:
        if not self.is_first:
            raise BadFrame("token frames go to the first shard only")
        queue = self.pending.get(frame.request_id)
        if queue is None:
            log.debug("token for finished request %s dropped", frame.request_id)
            return
        if len(frame.tokens.ids) != 1:
            raise BadFrame(f"expected one sampled token, got {len(frame.tokens.ids)}")
        vocab = int(self.source.config["vocab_size"])
        if frame.tokens.ids[0] >= vocab:
            raise BadFrame(f"token id {frame.tokens.ids[0]} is outside the vocabulary ({vocab})")
        queue.put_nowait((frame.tokens.ids[0], frame.compute_s, None))

    def _take_activation(self, frame: pb.ForwardFrame,
                         replies: asyncio.Queue) -> Awaitable[None]:
        if self.is_first:
            raise BadFrame("the first shard takes tokens, not activations")
        t = frame.activation
        self.engine.check_activation(list(t.shape), t.dtype, frame.position)
        prompt = list(frame.prompt_ids) or None
        if prompt is not None and not (frame.position < len(prompt)
                                       <= self.source.context_length):
            raise BadFrame(f"a first frame at position {frame.position} with a prompt of "
                           f"{len(prompt)} tokens: the prompt must be longer than the cached "
                           "prefix and fit the context")
        self._routes[frame.request_id] = replies
        sample = sampling_of(frame.sampling) if (frame.sample and self.is_last) else None
        step = self.engine.submit(frame.request_id, frame.position,
                                  hidden=(t.data, list(t.shape), t.dtype), sample=sample,
                                  prompt=prompt, group=frame.group)
        return self._forward_on(frame, step, prompt)

    async def _forward_on(self, frame: pb.ForwardFrame, step: asyncio.Future,
                          prompt: list[int] | None) -> None:
        """A frame's step, once computed: on to the next shard (or the token home)."""
        result = await step
        self.metrics.observe("step_compute", result.compute_s)
        await self.faults.after_compute(result.compute_s)
        self._send_on(frame.request_id, frame.position, result, frame.sample, frame.sampling,
                      frame.compute_s + result.compute_s, prompt, frame.group)

    def _send_on(self, request_id: str, position: int, result: StepResult, sample: bool,
                 sampling: pb.SamplingParams, compute_s: float,
                 prompt: list[int] | None = None, group: int = 0) -> None:
        """Hand a step's output to the next shard (or, from the last, the token home)."""
        assert self.link is not None
        frame = pb.ForwardFrame(request_id=request_id, epoch=self.epoch, position=position,
                                compute_s=compute_s, sent_unix_ns=time.time_ns(),
                                sender=self.node_id, group=group)
        if result.token is not None:
            frame.tokens.ids.append(result.token)
        elif result.hidden is not None:
            data, shape, dtype = result.hidden
            frame.activation.CopyFrom(pb.Tensor(data=data, shape=shape, dtype=dtype))
            frame.sample = sample
            frame.sampling.CopyFrom(sampling)
            if prompt is not None:
                frame.prompt_ids.extend(prompt)
        else:
            return  # last shard, prefill chunk: nothing to send
        if self.faults.cut_off((self.next_id, self.link.address), "to"):
            return  # a partition fault swallows it
        self.metrics.inc("frames_out")
        self.metrics.inc("bytes_out", frame.ByteSize())
        self.link.send(frame)

    def _release(self, request_id: str, reason: str, forward: bool) -> None:
        if self.group_of.pop(request_id, None) is not None:
            self._even_groups()
        self.engine.free(request_id)
        self._routes.pop(request_id, None)
        if self.link is not None:
            self.link.inflight.discard(request_id)
        if forward and self.link is not None:
            self.link.send(pb.ForwardFrame(request_id=request_id, epoch=self.epoch,
                                           release=pb.Release(reason=reason)))

    # ------------------------------------------------------------ requests (first shard)

    def generate(self, request: pb.GenerateRequest, already: list[int] = (),
                 emitted_chars: int = 0) -> AsyncIterator[pb.GenerateEvent]:
        """Run one request round the ring (node/runner.py's loop, with this backend)."""
        assert self.tokenizer is not None
        return serve_request(self, request, already, emitted_chars)

    async def begin(self, request_id: str, prompt: list[int], already: list[int],
                    request: pb.GenerateRequest, budget: int,
                    reuse: bool = True) -> asyncio.Future:
        """Take the longest cached prefix of the prompt (node/prompts.py), prefill the
        rest in chunks, replay `already` one decode step each without sampling (the same
        computation as the first time), then start the first sampled step. The first step
        carries the whole prompt: every shard takes the same prefix and caches the prompt
        when the request ends.

        While other requests are under way (with one group or several), the chunks fit a
        per-forward token budget sized from their decode rows (`Engine.chunk_tokens`):
        each chunk runs beside their steps or while they are on other shards, and they
        wait for a short chunk, not for the whole prompt. Each shard starts the next chunk
        as soon as it has sent one on, so the chunks of a long prompt flow through the
        shards one behind the other."""
        self.group_of[request_id] = self._least_loaded()
        pos = await self.engine.adopt(request_id, prompt) if reuse else 0
        if pos:
            self.metrics.inc("prompt_tokens_reused", pos)
        first = prompt if self.engine.batch.prompts.enabled else None
        end = len(prompt) - 1  # the last prompt token is the first decode step
        while pos < end:
            size = min(self.engine.chunk_tokens(request_id) or PREFILL_STEP, PREFILL_STEP)
            tokens = prompt[pos:min(pos + size, end)]
            await self._advance(request_id, pos, tokens, None, first)
            pos, first = pos + len(tokens), None
        steps = [[token] for token in [prompt[-1], *already]]
        for tokens in steps[:-1]:
            await self._advance(request_id, pos, tokens, None, first)
            pos, first = pos + len(tokens), None
        return asyncio.ensure_future(self._advance(request_id, pos, steps[-1],
                                                   request.sampling, first))

    def next(self, request_id: str, token: int, position: int,
             sampling: pb.SamplingParams) -> asyncio.Future:
        return asyncio.ensure_future(self._advance(request_id, position, [token], sampling))

    def end(self, request_id: str, finished: bool) -> None:
        self._release(request_id, "done" if finished else "error", forward=True)

    async def _advance(self, request_id: str, position: int, tokens: list[int],
                       sampling: pb.SamplingParams | None,
                       prompt: list[int] | None = None) -> None:
        """Run this shard on `tokens` and pass the result on (or sample, if alone)."""
        sample = sampling_of(sampling) if sampling is not None else None
        alone = self.link is None
        group = self.group_of.get(request_id, 0)
        result = await self.engine.step(request_id, position, tokens=tokens,
                                        sample=sample if alone else None, prompt=prompt,
                                        group=group)
        self.metrics.observe("step_compute", result.compute_s)
        await self.faults.after_compute(result.compute_s)
        if alone:
            queue = self.pending.get(request_id)
            if result.token is not None and queue is not None:
                queue.put_nowait((result.token, result.compute_s, None))
            return
        self._send_on(request_id, position, result, sampling is not None,
                      sampling or pb.SamplingParams(), result.compute_s, prompt, group)

    # ------------------------------------------------------------ micro-batches

    def group_sizes(self) -> list[int]:
        """Requests in each micro-batch (first shard)."""
        sizes = [0] * self.microbatches
        for g in self.group_of.values():
            sizes[g] += 1
        return sizes

    def _least_loaded(self) -> int:
        sizes = self.group_sizes()
        return sizes.index(min(sizes))

    def _even_groups(self) -> None:
        """A request ended: while the largest group has two more requests than the
        smallest, one of the largest moves (its next step goes with the smallest group; each
        shard copies its KV once, node/batch.py). Without it, a group whose requests all
        ended would run empty while another held most of the rows."""
        sizes = self.group_sizes()
        while max(sizes) - min(sizes) > 1:
            big, small = sizes.index(max(sizes)), sizes.index(min(sizes))
            mover = next(r for r, g in reversed(self.group_of.items()) if g == big)
            self.group_of[mover] = small
            sizes[big] -= 1
            sizes[small] += 1
