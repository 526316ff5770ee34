"""The pipeline data plane: activations flow shard to shard, tokens come back round.

Each node keeps one long-lived `Forward` stream to the next shard of the plan (the last
shard's "next" is the first shard, which closes the ring). The first shard owns the
requests: it tokenises, runs its layers, and sends hidden states on; the last shard
samples and sends the token back to the first, which streams it to the client and feeds
it in again. Frames for one request travel in order on one stream, so each shard sees
positions in order; frames of different requests interleave freely.

Errors travel backwards: a shard that rejects a frame answers on the stream the frame
came in on; the sender passes it on to its own upstream until it reaches the first
shard, which fails the request. Every request's caches are freed by a `release` frame
that follows the request round the ring when it ends, however it ends.
"""

from __future__ import annotations

import asyncio
import logging
import math
import statistics
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc

from node.auth import open_channel
from node.engine import Engine, Sampling, StepResult
from node.errors import (
    BadFrame,
    ContextOverflow,
    EpochNotLoaded,
    NodeError,
    PeerUnavailable,
    RequestTimeout,
    StaleEpoch,
)
from node.faults import FaultBook
from node.metrics import NodeMetrics
from protos import cluster_pb2 as pb
from protos import cluster_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

PREFILL_STEP = 2048
MAX_TIMEOUT_S = 3600.0
MIN_TOKEN_TIMEOUT_S = 2.0
MIN_FIRST_TOKEN_TIMEOUT_S = 10.0  # as mlx_lm.generate_step's prefill_step_size
DEFAULT_MAX_TOKENS = 128
MAX_MESSAGE_BYTES = 512 * 1024 * 1024
MAX_FRAMES_PER_MESSAGE = 64
MAX_BATCH_BYTES = 4 * 1024 * 1024  # bigger frames (long prefill chunks) go one by one
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


def _message(frames: list[pb.ForwardFrame]) -> pb.ForwardFrame:
    return frames[0] if len(frames) == 1 else pb.ForwardFrame(batch=frames)


def unbatch(message: pb.ForwardFrame) -> list[pb.ForwardFrame]:
    """The frames a Forward message carries (itself, or its batch)."""
    return list(message.batch) if len(message.batch) else [message]


class PeerLink:
    """The outgoing Forward stream to one neighbour, opened on first use.

    A broken stream fails every request that went through it (via `on_broken`) and is
    reopened by the next send, so a neighbour that restarts is picked up again.
    """

    def __init__(self, address: str, on_reply: Callable[[pb.ForwardReply], None],
                 on_broken: Callable[[set[str], str], None],
                 metadata: tuple[tuple[str, str], ...] = (), ca: Path | None = None) -> None:
        self.address = address
        self._on_reply = on_reply
        self._on_broken = on_broken
        self._metadata = metadata
        self._channel = open_channel(address, CHANNEL_OPTIONS, ca)
        self._queue: asyncio.Queue[pb.ForwardFrame | None] | None = None
        self._reader: asyncio.Task | None = None
        self._closed = False
        self.inflight: set[str] = set()

    def send(self, frame: pb.ForwardFrame) -> None:
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
            # what has queued up meanwhile (the frames of one batched forward) goes as one
            # message: one write and one read instead of one per request
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
        self._queue = queue
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
        self._closed = True
        queue, self._queue = self._queue, None
        if queue is not None:
            queue.put_nowait(None)
        if self._reader is not None:
            self._reader.cancel()
        await self._channel.close(grace=0.5)


class Pipeline:
    """This node's place in one plan (epoch): its engine, its link, its requests."""

    def __init__(self, node_id: str, plan: pb.Plan, engine: Engine, metrics: NodeMetrics,
                 request_timeout_s: float = 120.0,
                 metadata: tuple[tuple[str, str], ...] = (), faults: FaultBook | None = None,
                 peer_ca: Path | None = None) -> None:
        self.plan = plan
        self.faults = faults or FaultBook(allowed=False)
        self.epoch = plan.epoch
        self.engine = engine
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
            self.link = PeerLink(nxt.address, self._on_reply, self._on_broken, metadata, peer_ca)
        self._pending: dict[str, asyncio.Queue] = {}  # first shard: requests it owns
        self._routes: dict[str, asyncio.Queue] = {}  # where to send errors back for a request

    @property
    def active_requests(self) -> int:
        return self.engine.active_requests

    def free_idle(self, max_idle_s: float) -> list[str]:
        return self.engine.free_idle(max_idle_s)

    async def close(self, reason: str = "the plan was replaced") -> None:
        for queue in self._pending.values():
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
        if request_id in self._pending:
            error = NodeError(message)
            error.code = code if code in grpc.StatusCode.__members__ else "INTERNAL"
            self._pending[request_id].put_nowait(error)
        elif request_id in self._routes:
            self._routes[request_id].put_nowait(
                pb.ForwardReply(request_id=request_id, epoch=self.epoch, code=code, error=message))
        else:
            log.info("error for finished or unknown request %s: %s %s", request_id, code, message)

    # ------------------------------------------------------------ frames in

    async def handle_frame(self, frame: pb.ForwardFrame, replies: asyncio.Queue) -> None:
        """Act on one frame from the upstream neighbour; raise NodeError to reject it."""
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
            await self._take_activation(frame, replies)
        else:
            raise BadFrame("frame without payload (activation, tokens or release)")

    def _take_tokens(self, frame: pb.ForwardFrame) -> None:
        if not self.is_first:
            raise BadFrame("token frames go to the first shard only")
        queue = self._pending.get(frame.request_id)
        if queue is None:
            log.debug("token for finished request %s dropped", frame.request_id)
            return
        if len(frame.tokens.ids) != 1:
            raise BadFrame(f"expected one sampled token, got {len(frame.tokens.ids)}")
        vocab = int(self.engine.shard.source.config["vocab_size"])
        if frame.tokens.ids[0] >= vocab:
            raise BadFrame(f"token id {frame.tokens.ids[0]} is outside the vocabulary ({vocab})")
        queue.put_nowait((frame.tokens.ids[0], frame.compute_s))

    async def _take_activation(self, frame: pb.ForwardFrame, replies: asyncio.Queue) -> None:
        if self.is_first:
            raise BadFrame("the first shard takes tokens, not activations")
        t = frame.activation
        self.engine.check_activation(list(t.shape), t.dtype, frame.position)
        self._routes[frame.request_id] = replies
        sample = _sampling(frame.sampling) if (frame.sample and self.is_last) else None
        result = await self.engine.step(frame.request_id, frame.position,
                                        hidden=(t.data, list(t.shape), t.dtype), sample=sample)
        self.metrics.observe("step_compute", result.compute_s)
        await self.faults.after_compute(result.compute_s)
        self._send_on(frame.request_id, frame.position, result, frame.sample, frame.sampling,
                      frame.compute_s + result.compute_s)

    def _send_on(self, request_id: str, position: int, result: StepResult, sample: bool,
                 sampling: pb.SamplingParams, compute_s: float) -> None:
        """Hand a step's output to the next shard (or, from the last, the token home)."""
        assert self.link is not None
        frame = pb.ForwardFrame(request_id=request_id, epoch=self.epoch, position=position,
                                compute_s=compute_s, sent_unix_ns=time.time_ns(),
                                sender=self.node_id)
        if result.token is not None:
            frame.tokens.ids.append(result.token)
        elif result.hidden is not None:
            data, shape, dtype = result.hidden
            frame.activation.CopyFrom(pb.Tensor(data=data, shape=shape, dtype=dtype))
            frame.sample = sample
            frame.sampling.CopyFrom(sampling)
        else:
            return  # last shard, prefill chunk: nothing to send
        if self.faults.cut_off((self.next_id, self.link.address), "to"):
            return  # a partition fault swallows it
        self.metrics.inc("frames_out")
        self.metrics.inc("bytes_out", frame.ByteSize())
        self.link.send(frame)

    def _release(self, request_id: str, reason: str, forward: bool) -> None:
        self.engine.free(request_id)
        self._routes.pop(request_id, None)
        if self.link is not None:
            self.link.inflight.discard(request_id)
        if forward and self.link is not None:
            self.link.send(pb.ForwardFrame(request_id=request_id, epoch=self.epoch,
                                           release=pb.Release(reason=reason)))

    # ------------------------------------------------------------ requests (first shard)

    async def generate(self, request: pb.GenerateRequest, already: list[int] = (),
                       emitted_chars: int = 0) -> AsyncIterator[pb.GenerateEvent]:
        """Run one request round the ring, yielding a GenerateEvent per token, then done.

        `already` are tokens a client received before a fail-over: they are replayed (the
        prompt is prefilled exactly as before, then each token is fed one step at a time
        without sampling, the same computation as the first time, so greedy output is
        unchanged) and generation continues after them; `emitted_chars` of their text is
        not sent again."""
        shard = self.engine.shard
        tokenizer = shard.tokenizer
        assert tokenizer is not None
        ids, max_tokens, timeout = await check_request(request, tokenizer, shard.source,
                                                       self.request_timeout_s)
        already = list(already)[:max_tokens]
        sampling = request.sampling
        stream = TokenStream(tokenizer, request, len(ids), max_tokens, already, emitted_chars,
                             self.metrics)
        request_id = stream.request_id
        queue: asyncio.Queue = asyncio.Queue()
        self._pending[request_id] = queue
        self.metrics.inc("requests_started")
        reason = "error"
        step: asyncio.Future | None = None
        try:
            prefix, pos = ids[:-1], 0
            for i in range(0, len(prefix), PREFILL_STEP):
                chunk = prefix[i:i + PREFILL_STEP]
                await self._advance(request_id, pos, chunk, None, queue)
                pos += len(chunk)
            feed = [ids[-1], *already]
            for token in feed[:-1]:  # replay: one decode step each, no sampling
                await self._advance(request_id, pos, [token], None, queue)
                pos += 1
            if not stream.more:
                raise BadFrame("nothing left to generate after the replayed tokens")
            # the next step starts before this token is written to the client, so the
            # client write overlaps the ring's work instead of adding to every token
            step = asyncio.ensure_future(self._advance(request_id, pos, [feed[-1]], sampling,
                                                       queue))
            pos += 1
            while step is not None:
                await step
                step = None
                token, compute_s = await self._next_token(queue, stream.timeout(timeout))
                event = stream.accept(token, compute_s)
                if event is None:
                    break  # end of sequence
                if stream.more:
                    step = asyncio.ensure_future(
                        self._advance(request_id, pos, [token], sampling, queue))
                    pos += 1
                yield event
            reason = "done"
            yield stream.done(self.epoch)
        finally:
            if step is not None:
                if not step.done():
                    step.cancel()
                elif not step.cancelled():
                    step.exception()  # retrieved: the request already failed or ended
            if reason != "done":
                self.metrics.inc("requests_failed")
            self._pending.pop(request_id, None)
            try:
                self._release(request_id, reason, forward=True)
            except Exception:  # never hide the request's own outcome behind a cleanup error
                log.exception("releasing request %s failed", request_id)

    async def _advance(self, request_id: str, position: int, tokens: list[int],
                       sampling: pb.SamplingParams | None, queue: asyncio.Queue) -> None:
        """Run this shard on `tokens` and pass the result on (or sample, if alone)."""
        sample = _sampling(sampling) if sampling is not None else None
        alone = self.link is None
        result = await self.engine.step(request_id, position, tokens=tokens,
                                        sample=sample if alone else None)
        self.metrics.observe("step_compute", result.compute_s)
        await self.faults.after_compute(result.compute_s)
        if alone:
            if result.token is not None:
                queue.put_nowait((result.token, result.compute_s))
            return
        self._send_on(request_id, position, result, sampling is not None,
                      sampling or pb.SamplingParams(), result.compute_s)

    @staticmethod
    async def _next_token(queue: asyncio.Queue, timeout: float) -> tuple[int, float]:
        try:
            item = await asyncio.wait_for(queue.get(), timeout)
        except TimeoutError:
            raise RequestTimeout(
                f"no token came back round the ring within {timeout:.0f} s") from None
        if isinstance(item, Exception):
            raise item
        return item


async def check_request(request: pb.GenerateRequest, tokenizer, source,
                        default_timeout_s: float) -> tuple[list[int], int, float]:
    """Validate a Generate request: (prompt ids, max new tokens, timeout). Raises NodeError
    for anything a client got wrong, before any work starts."""
    context = source.context_length
    if len(request.prompt) > 16 * context:  # far beyond the context whatever the tokenizer
        raise ContextOverflow(f"prompt is {len(request.prompt)} characters; the model's "
                              f"context is {context} tokens")
    if not math.isfinite(request.timeout_s) or request.timeout_s < 0:
        raise BadFrame(f"timeout_s must be a positive number of seconds, not "
                       f"{request.timeout_s}")
    ids = list(request.prompt_ids) or await asyncio.get_running_loop().run_in_executor(
        None, tokenizer.encode, request.prompt, request.chat)  # off the event loop
    if not ids:
        raise BadFrame("empty prompt: give a prompt text or prompt_ids")
    vocab = int(source.config["vocab_size"])
    if max(ids) >= vocab:
        raise BadFrame(f"prompt token id {max(ids)} is outside the vocabulary ({vocab})")
    if len(ids) >= context:
        raise ContextOverflow(f"prompt is {len(ids)} tokens; the model's context is {context}")
    max_tokens = min(request.max_tokens or DEFAULT_MAX_TOKENS, context - len(ids))
    timeout = min(request.timeout_s or default_timeout_s, MAX_TIMEOUT_S)
    return ids, max_tokens, timeout


class TokenStream:
    """One request's tokens as the client sees them: text (held back mid-character), timing
    and metrics per token, and the final GenerateDone. Shared by every backend.

    `already` are tokens the client has from before a fail-over; their text is replayed
    through the detokenizer token by token, as the first run read it, and the part of it
    beyond `emitted_chars` (held back then) goes out with the next token."""

    def __init__(self, tokenizer, request: pb.GenerateRequest, prompt_tokens: int,
                 max_tokens: int, already: list[int], emitted_chars: int,
                 metrics: NodeMetrics) -> None:
        self.request_id = uuid.uuid4().hex
        self._eos = set() if request.ignore_eos else set(tokenizer.eos_ids)
        self._metrics = metrics
        self._prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self._replayed = len(already)
        self._detok = tokenizer.detokenizer()
        replayed = ""
        for token in already:
            self._detok.add_token(token)
            replayed += self._detok.last_segment
        self._carry = replayed[emitted_chars:]
        self.generated = len(already)
        self.finish = "length"
        self._recent: deque[float] = deque(maxlen=16)  # latest token latencies
        self.t_start = self._t_prev = self._t_first = time.perf_counter()

    @property
    def more(self) -> bool:
        return self.finish == "length" and self.generated < self.max_tokens

    def timeout(self, limit: float) -> float:
        return token_timeout(limit, self._recent, self.generated > self._replayed,
                             self._metrics)

    def accept(self, token: int, compute_s: float,
               logprob: float | None = None) -> pb.GenerateEvent | None:
        """The event for a sampled token; None for end-of-sequence (not streamed)."""
        now = time.perf_counter()
        latency, self._t_prev = now - self._t_prev, now
        self._recent.append(latency)
        self.generated += 1
        if self.generated == self._replayed + 1:
            self._t_first = now
            self._metrics.observe("ttft", latency)
        else:
            self._metrics.observe("token_latency", latency)
            self._metrics.observe("token_compute", compute_s)
            self._metrics.observe("token_transfer", max(0.0, latency - compute_s))
        if token in self._eos:
            self.finish = "stop"
            self._detok.finalize()
            return None
        self._detok.add_token(token)
        if self.generated >= self.max_tokens:
            self._detok.finalize()
        self._metrics.inc("tokens_generated")
        text, self._carry = self._carry + self._detok.last_segment, ""
        event = pb.GenerateEvent(request_id=self.request_id, token=pb.TokenEvent(
            token_id=token, text=text, index=self.generated - 1, latency_s=latency,
            compute_s=compute_s))
        if logprob is not None:
            event.token.logprob = logprob
        return event

    def done(self, epoch: int) -> pb.GenerateEvent:
        decode_n = self.generated - self._replayed - 1
        decode_s = self._t_prev - self._t_first
        stop = self.finish == "stop"
        self._metrics.inc("requests_completed")
        return pb.GenerateEvent(request_id=self.request_id, done=pb.GenerateDone(
            finish_reason=self.finish, prompt_tokens=self._prompt_tokens,
            # completion_tokens counts the replayed ones too: the client has them all
            completion_tokens=self.generated - stop,  # EOS is not streamed
            ttft_s=self._t_first - self.t_start, total_s=time.perf_counter() - self.t_start,
            decode_tokens_per_s=decode_n / decode_s if decode_n > 0 and decode_s > 0 else 0.0,
            epoch=epoch, tail_text=self._carry + self._detok.last_segment if stop else ""))


def token_timeout(limit: float, recent: deque, decoding: bool, metrics: NodeMetrics) -> float:
    """How long to wait for the next token, so a frame lost on the way is noticed in
    seconds and the request replayed, not after minutes: 10x this request's median token
    latency once it has a few (at least 2 s); for a first token, 10x the node's p99 time
    to first token (at least 10 s) once it has served some; else the request's limit."""
    if decoding and len(recent) >= 3:
        return min(limit, max(MIN_TOKEN_TIMEOUT_S, 10 * statistics.median(recent)))
    ttft = metrics.histograms.get("ttft")
    if ttft is not None and ttft.total >= 3:
        return min(limit, max(MIN_FIRST_TOKEN_TIMEOUT_S, 10 * ttft.percentile(99)))
    return limit


def _sampling(params: pb.SamplingParams) -> Sampling:
    return Sampling(temperature=params.temperature, top_p=params.top_p,
                    seed=params.seed if params.HasField("seed") else -1)
