"""What every backend of a plan offers the node service, and the request loop the first
shard runs for all of them.

A plan is run by a `Runner`: the gRPC pipeline (node/pipeline.py) or an mlx-ring group
(node/ring.py). The node service holds one at a time and asks it only what the Protocol
below says. Whatever the backend, a request on the first shard goes through
`serve_request`: validation (`check_request`: the prompt, or chat messages through the
model's chat template, and the stop strings), the replay of tokens a client already has
after a fail-over, a `TokenStream` (text, stop strings, timings, metrics), the queue its
tokens come back on, and cleanup however it ends. The backend (`Backend`) only starts the
request's work, feeds each token back in, and ends it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import statistics
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable
from typing import Any, Protocol, runtime_checkable

from node.errors import BadFrame, ContextOverflow, NodeError, PrefixEvicted, RequestTimeout
from node.metrics import NodeMetrics
from node.sampling import Sampling
from protos import cluster_pb2 as pb

log = logging.getLogger(__name__)

MAX_TIMEOUT_S = 3600.0
MIN_TOKEN_TIMEOUT_S = 2.0
MIN_FIRST_TOKEN_TIMEOUT_S = 10.0
DEFAULT_MAX_TOKENS = 128
MAX_STOP = 4  # stop strings per request, as OpenAI's API
MAX_STOP_CHARS = 256  # characters per stop string
MAX_MESSAGES = 1024  # chat messages per request
ROLES = ("system", "developer", "user", "assistant", "tool")


@runtime_checkable
class Runner(Protocol):
    """This node's part in one plan (epoch), as the node service sees it."""

    plan: pb.Plan
    epoch: int
    source: Any  # node.models.ModelSource: the model it runs
    is_first: bool  # holds the plan's first shard (layer 0, or rank 0): serves Generate
    entry_address: str  # where Generate goes for this plan

    @property
    def active_requests(self) -> int: ...

    @property
    def state(self) -> str:
        """"ready", "serving", "starting", "down" or "stopped"."""

    @property
    def held_bytes(self) -> int:
        """MLX memory this plan holds outside this process (an mlx-ring worker's)."""

    def shard_info(self) -> pb.ShardInfo: ...

    def handle_frame(self, frame: pb.ForwardFrame,
                     replies: asyncio.Queue) -> Awaitable[None] | None:
        """Start a data-plane frame from the upstream neighbour at once (raise NodeError
        to reject it); returns what is left to wait for (that may raise NodeError too)."""

    def generate(self, request: pb.GenerateRequest, already: list[int] = (),
                 emitted_chars: int = 0) -> AsyncIterator[pb.GenerateEvent]:
        """Serve one request (first shard only); `already`: tokens the client has."""

    def wake(self) -> None:
        """Rank 0 of an mlx-ring group is about to share a request (NodeError otherwise)."""

    def mark_down(self, reason: str) -> None:
        """The plan cannot go on (a peer is gone): fail what is in flight."""

    def free_idle(self, max_idle_s: float) -> list[str]: ...

    async def close(self, reason: str = "the plan was replaced") -> None: ...


class Backend(Protocol):
    """A backend's side of `serve_request`. Token queues carry (token, compute_s,
    logprob or None) tuples, an Exception to fail the request, or None when the backend
    ended the request itself."""

    tokenizer: Any
    source: Any  # node.models.ModelSource
    metrics: NodeMetrics
    request_timeout_s: float
    epoch: int
    pending: dict[str, asyncio.Queue]  # the requests it serves, by id
    patient_first_token: bool  # a first token may wait behind earlier requests

    async def begin(self, request_id: str, prompt: list[int], already: list[int],
                    request: pb.GenerateRequest, budget: int,
                    reuse: bool = True) -> Awaitable | None:
        """Start the request (prefill, replay of `already`, the first sampled step);
        returns work still under way that must finish before the next token. `reuse`: it
        may start from a cached prefix of its prompt (where the backend has a cache)."""

    def next(self, request_id: str, token: int, position: int,
             sampling: pb.SamplingParams) -> Awaitable | None:
        """Feed a sampled token back in at `position` (None: the backend does it)."""

    def end(self, request_id: str, finished: bool) -> None:
        """Release the request's resources; `finished`: it ended by the backend's own rule
        (max tokens or end of sequence). Otherwise (it failed, its client left, a stop
        string matched) the backend stops whatever work it still has for it."""


async def serve_request(backend: Backend, request: pb.GenerateRequest,
                        already: list[int] = (),
                        emitted_chars: int = 0) -> AsyncIterator[pb.GenerateEvent]:
    """Run one request on the first shard, yielding a GenerateEvent per token, then done.

    `already` are tokens a client received before a fail-over: the backend replays them
    (the same computation as the first time, so greedy output is unchanged) and generation
    continues after them; `emitted_chars` of their text is not sent again."""
    ids, max_tokens, timeout = await check_request(request, backend.tokenizer, backend.source,
                                                   backend.request_timeout_s)
    already = list(already)[:max_tokens]
    stream = TokenStream(backend.tokenizer, request, len(ids), max_tokens, already,
                         emitted_chars, backend.metrics)
    if not stream.more:
        raise BadFrame("nothing left to generate after the replayed tokens")
    request_id = stream.request_id
    queue: asyncio.Queue = asyncio.Queue()
    backend.pending[request_id] = queue
    backend.metrics.inc("requests_started")
    finished = False
    work: Awaitable | None = None
    reuse = True
    try:
        work = await backend.begin(request_id, ids, already, request,
                                   max_tokens - len(already))
        while True:
            if work is not None:
                await work
                work = None
            patient = backend.patient_first_token and stream.generated == len(already)
            try:
                item = await next_token(queue, timeout if patient else stream.timeout(timeout))
            except NodeError as e:
                if e.code != PrefixEvicted.code or not reuse or stream.generated > len(already):
                    raise
                # a later shard no longer holds the cached prefix the first shard reused:
                # run it again from the start, as a new request without reuse
                log.info("request %s: %s; running it again without the prefix cache",
                         request_id, e)
                backend.pending.pop(request_id, None)
                backend.end(request_id, False)
                request_id, queue, reuse = uuid.uuid4().hex, asyncio.Queue(), False
                backend.pending[request_id] = queue
                backend.metrics.inc("prefix_retries")
                work = await backend.begin(request_id, ids, already, request,
                                           max_tokens - len(already), reuse=False)
                continue
            if item is None:
                break  # the backend ended the request
            token, compute_s, logprob = item
            # the next step starts before this token is written to the client (and, when
            # the token id alone says it is not the last, before it is detokenised), so
            # that work overlaps the backend's instead of adding to every token
            if stream.continues_after(token):
                work = backend.next(request_id, token, len(ids) + stream.generated,
                                    request.sampling)
            event = stream.accept(token, compute_s, logprob)
            if event is None:
                break  # end of sequence
            if stream.more and work is None:
                work = backend.next(request_id, token, len(ids) - 1 + stream.generated,
                                    request.sampling)
            yield event
            if not stream.more:
                break
        finished = True
        yield stream.done(backend.epoch)
    finally:
        if isinstance(work, asyncio.Future):
            if not work.done():
                work.cancel()
            elif not work.cancelled():
                work.exception()  # retrieved: the request already failed or ended
        if not finished:
            backend.metrics.inc("requests_failed")
        backend.pending.pop(request_id, None)
        try:
            backend.end(request_id, finished and not stream.stopped)
        except Exception:  # never hide the request's own outcome behind a cleanup error
            log.exception("ending request %s failed", request_id)


async def next_token(queue: asyncio.Queue, timeout: float) -> tuple[int, float, float | None]:
    # (the queue is awaited in this task, under asyncio.timeout, rather than through
    # wait_for, which wraps queue.get() in a task of its own for every token)
    try:
        async with asyncio.timeout(timeout):
            item = await queue.get()
    except TimeoutError:
        raise RequestTimeout(f"no token came back within {timeout:.0f} s") from None
    if isinstance(item, Exception):
        raise item
    return item


def sampling_of(params: pb.SamplingParams) -> Sampling:
    return Sampling(temperature=params.temperature, top_p=params.top_p,
                    seed=params.seed if params.HasField("seed") else -1)


async def check_request(request: pb.GenerateRequest, tokenizer, source,
                        default_timeout_s: float) -> tuple[list[int], int, float]:
    """Validate a Generate request: (prompt ids, max new tokens, timeout). Raises NodeError
    for anything a client got wrong, before any work starts."""
    context = source.context_length
    check_stops(request.stop)
    text = request.prompt if not request.messages else "".join(
        m.content for m in check_messages(request))
    if len(text) > 16 * context:  # far beyond the context whatever the tokenizer
        raise ContextOverflow(f"prompt is {len(text)} characters; the model's context is "
                              f"{context} tokens")
    if not math.isfinite(request.timeout_s) or request.timeout_s < 0:
        raise BadFrame(f"timeout_s must be a positive number of seconds, not "
                       f"{request.timeout_s}")
    ids = list(request.prompt_ids) or await asyncio.get_running_loop().run_in_executor(
        None, encode, tokenizer, request)  # off the event loop
    if not ids:
        raise BadFrame("empty prompt: give a prompt text, prompt_ids or messages")
    vocab = int(source.config["vocab_size"])
    if max(ids) >= vocab:
        raise BadFrame(f"prompt token id {max(ids)} is outside the vocabulary ({vocab})")
    if len(ids) >= context:
        raise ContextOverflow(f"prompt is {len(ids)} tokens; the model's context is "
                              f"{context} tokens")
    max_tokens = min(request.max_tokens or DEFAULT_MAX_TOKENS, context - len(ids))
    timeout = min(request.timeout_s or default_timeout_s, MAX_TIMEOUT_S)
    return ids, max_tokens, timeout


def check_stops(stops) -> None:
    if len(stops) > MAX_STOP:
        raise BadFrame(f"{len(stops)} stop strings; give at most {MAX_STOP}")
    for stop in stops:
        if not stop or len(stop) > MAX_STOP_CHARS:
            raise BadFrame(f"a stop string must have 1 to {MAX_STOP_CHARS} characters, not "
                           f"{len(stop)}")


def check_messages(request: pb.GenerateRequest):
    """The request's chat messages, checked: roles, count, and no prompt beside them."""
    messages = request.messages
    if request.prompt or request.prompt_ids:
        raise BadFrame("give either messages or a prompt (prompt, prompt_ids), not both")
    if len(messages) > MAX_MESSAGES:
        raise BadFrame(f"{len(messages)} chat messages; give at most {MAX_MESSAGES}")
    for i, message in enumerate(messages):
        if message.role not in ROLES:
            raise BadFrame(f"message {i} has role {message.role[:40]!r}; a role is one of "
                           f"{', '.join(ROLES)}")
    return messages


def encode(tokenizer, request: pb.GenerateRequest) -> list[int]:
    """The prompt's token ids: the messages through the model's chat template, or the
    prompt text (in the template as one user turn when `chat` is set)."""
    if not request.messages:
        return tokenizer.encode(request.prompt, request.chat)
    try:
        return tokenizer.encode_messages([{"role": m.role, "content": m.content}
                                          for m in request.messages])
    except Exception as e:  # the model's own (Jinja) template refused the conversation
        raise BadFrame(f"the model's chat template refused these messages: "
                       f"{type(e).__name__}: {e}") from e


class StopText:
    """Cuts generated text at the first stop string, holding back text that may be the
    start of one: what `feed` returns is safe to send."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        if self.stopped or not self.stops:
            return "" if self.stopped else text
        self.pending += text
        cut = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0),
                  default=-1)
        if cut >= 0:
            self.stopped = True
            out, self.pending = self.pending[:cut], ""
            return out
        keep = max((k for s in self.stops for k in range(1, len(s))
                    if self.pending.endswith(s[:k])), default=0)
        out = self.pending[:len(self.pending) - keep]
        self.pending = self.pending[len(out):]
        return out

    def flush(self) -> str:
        """What is held back, once nothing more comes."""
        out, self.pending = self.pending, ""
        return out


class TokenStream:
    """One request's tokens as the client sees them: text (held back mid-character and
    where it may begin a stop string), timing and metrics per token, and the final
    GenerateDone. Shared by every backend. A stop string ends the request: the text before
    it goes out with the token that completed it, and no step follows.

    `already` are tokens the client has from before a fail-over; their text is replayed
    through the detokenizer token by token, as the first run read it, and the part of it
    beyond `emitted_chars` (held back then) goes out with the next token, through the stop
    strings as the first run would have sent it."""

    def __init__(self, tokenizer, request: pb.GenerateRequest, prompt_tokens: int,
                 max_tokens: int, already: list[int], emitted_chars: int,
                 metrics: NodeMetrics) -> None:
        self.request_id = uuid.uuid4().hex
        self._eos_ids = set() if request.ignore_eos else set(tokenizer.eos_ids)
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
        self._stops = StopText(list(request.stop))
        self.generated = len(already)
        self.finish = "length"
        self._eos = False  # the last token was end-of-sequence (not streamed)
        self._recent: deque[float] = deque(maxlen=16)  # latest token latencies
        self.t_start = self._t_prev = self._t_first = time.perf_counter()

    @property
    def more(self) -> bool:
        return self.finish == "length" and self.generated < self.max_tokens

    def continues_after(self, token: int) -> bool:
        """Whether generation surely goes on after `token`, known from its id alone: not
        end-of-sequence, not the last allowed, and no stop strings to match."""
        return (not self._stops.stops and token not in self._eos_ids
                and self.generated + 1 < self.max_tokens and self.finish == "length")

    @property
    def stopped(self) -> bool:
        """A stop string ended the request (the backend's own rule did not)."""
        return self._stops.stopped

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
        if token in self._eos_ids:
            self.finish, self._eos = "stop", True
            self._detok.finalize()
            return None
        self._detok.add_token(token)
        if self.generated >= self.max_tokens:
            self._detok.finalize()
        self._metrics.inc("tokens_generated")
        text, self._carry = self._stops.feed(self._carry + self._detok.last_segment), ""
        if self._stops.stopped:
            self.finish = "stop"
        elif self.generated >= self.max_tokens:
            text += self._stops.flush()
        event = pb.GenerateEvent(request_id=self.request_id, token=pb.TokenEvent(
            token_id=token, text=text, index=self.generated - 1, latency_s=latency,
            compute_s=compute_s))
        if logprob is not None:
            event.token.logprob = logprob
        return event

    def done(self, epoch: int) -> pb.GenerateEvent:
        decode_n = self.generated - self._replayed - 1
        decode_s = self._t_prev - self._t_first
        tail = ""
        if self._eos:  # the text held back until the end
            tail = self._stops.feed(self._carry + self._detok.last_segment)
            tail += self._stops.flush()
        self._metrics.inc("requests_completed")
        return pb.GenerateEvent(request_id=self.request_id, done=pb.GenerateDone(
            finish_reason=self.finish, prompt_tokens=self._prompt_tokens,
            # completion_tokens counts the replayed ones too: the client has them all
            completion_tokens=self.generated - self._eos,  # EOS is not streamed
            ttft_s=self._t_first - self.t_start, total_s=time.perf_counter() - self.t_start,
            decode_tokens_per_s=decode_n / decode_s if decode_n > 0 and decode_s > 0 else 0.0,
            epoch=epoch, tail_text=tail))


def token_timeout(limit: float, recent: deque, decoding: bool, metrics: NodeMetrics) -> float:
    """How long to wait for the next token, so a frame lost on the way is noticed in
    seconds and the request replayed, not after minutes: 10x this request's median token
    latency once it has a few (at least 2 s); for a first token, 10x the node's median time
    to first token (at least 10 s) once it has served some; else the request's limit. (The
    median, not a high percentile: under faults the slowest first tokens are replays, and
    a bound made from them made each lost frame cost a minute.)"""
    if decoding and len(recent) >= 3:
        return min(limit, max(MIN_TOKEN_TIMEOUT_S, 10 * statistics.median(recent)))
    ttft = metrics.histograms.get("ttft")
    if ttft is not None and ttft.total >= 3:
        return min(limit, max(MIN_FIRST_TOKEN_TIMEOUT_S, 10 * ttft.percentile(50)))
    return limit
