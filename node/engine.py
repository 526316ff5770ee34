"""The MLX shard worker: runs a shard's layers for many requests, one KV cache each.

All MLX work happens on one dedicated thread (MLX arrays and streams are not meant
to be shared across threads mid-computation), so the node's event loop keeps serving
heartbeats and other RPCs while a layer computes. Every forward is the model's own
mlx-lm code over the shard's layers (node/shardrun.py), with mlx-lm's caches: a request
alone keeps its own, requests that decode together share mlx-lm's batch caches, and
sampling is `generate_step`'s (logits of the last position, log-softmax, then the
sampler), so a split model gives the same tokens as the whole one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from node.errors import BadFrame, ContextOverflow, FrameGap, ModelCodeError, NodeError
from node.models import Shard
from node.wire import Wire, decode_tensor, encode_rows


@dataclass
class Sampling:
    temperature: float = 0.0
    top_p: float = 0.0
    seed: int = -1


@dataclass
class RequestState:
    caches: list  # its own KV cache per layer (empty while its row is in the _Group)
    length: int = 0  # positions its cache holds
    last_used: float = field(default_factory=time.monotonic)
    key: Any = None  # its own random key (sampled requests), split at every token
    stepped: float = 0.0  # when its last step reached this shard


@dataclass
class _Group:
    """Requests that decode together, their KV caches side by side in mlx-lm's
    BatchKVCache (one per layer): a forward of exactly these rows writes and reads every
    row's cache at once. A request leaving (or stepping alone) gets its own cache back."""
    ids: list[str]
    states: list[RequestState]  # the request state each row belongs to
    caches: list


GATHER_RECENT_S = 1.0  # a request is waited for by a forward if it stepped this recently
# ... or within two ring cycles, on a model whose steps take longer; and the first shard
# waits for the others' steps up to this share of a cycle (at most MAX_GATHER_S), so that
# two waves of requests that started apart merge into one batch within a cycle
CYCLE_SHARE = 0.5
MAX_GATHER_S = 2.0
PACK_TOKENS = 2048  # prefill positions packed into one forward beside the decode steps
ADMIT_ROUNDS = 5  # a burst of new requests is admitted for at most this many admit_s
PAD_FACTOR = 2  # a decoding group's padding may at most double its KV cache


@dataclass
class StepResult:
    hidden: Wire | None  # hidden states for the next shard, already serialised
    token: int | None  # sampled token (last shard, sample=True)
    compute_s: float


@dataclass
class _Job:
    """One request's step, waiting for the MLX thread."""

    request_id: str
    position: int
    tokens: list[int] | None
    hidden: Wire | None
    sample: Sampling | None
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop

    @property
    def size(self) -> int:
        """Positions this step computes (1 for a decode step; 0 for a malformed frame,
        which fails when its input is read)."""
        if self.tokens is not None:
            return len(self.tokens)
        if self.hidden is not None and len(self.hidden[1]) == 3:
            return int(self.hidden[1][1])
        return 0

    @property
    def decode(self) -> bool:
        """One position: a decode step (a row of the group's batched attention)."""
        return self.size == 1

    def settle(self, result: Any = None, error: BaseException | None = None) -> None:
        settle_together([(self, result)] if error is None else [(self, error)])

    def _deliver(self, outcome: Any) -> None:
        """On the event loop: the step's result, or its error."""
        if self.future.done():
            return  # the request went away meanwhile
        if isinstance(outcome, BaseException):
            self.future.set_exception(outcome)
        else:
            self.future.set_result(outcome)


def settle_together(outcomes: list[tuple[_Job, Any]]) -> None:
    """From the MLX thread: deliver the steps of one forward (results or errors) in one
    event-loop callback, so that their requests carry on together (their frames leave as
    one message) rather than the first one running before the others are settled."""
    if not outcomes:
        return

    def deliver() -> None:
        for job, outcome in outcomes:
            job._deliver(outcome)

    outcomes[0][0].loop.call_soon_threadsafe(deliver)


class Engine:
    """Holds a Shard and the per-request KV caches; every MLX call runs on one thread.

    Continuous batching: steps wait in a queue; each time the MLX thread is free it takes
    what is queued and runs the steps of different requests (decode steps and prefill
    chunks) as one forward, so the weights are read once for all of them. A request joins
    or leaves between two forwards.
    """

    def __init__(self, shard: Shard, executor: ThreadPoolExecutor,
                 on_forward: Callable[[int], None] | None = None,
                 max_batch: int = 64, gather_s: float = 0.0, admit_s: float = 0.0) -> None:
        self.shard = shard
        # in a multi-node plan a shard waits up to this long for the next steps of every
        # request under way, so that requests travel the ring together in one batch
        # (without it they settle into several small waves that never meet)
        self.gather_s = gather_s
        # and the first shard, when no request is under way, lets a burst of new requests
        # arrive until none came for this long, so that they prefill as one forward and
        # then decode as one wave (started one by one, each shard would run them in several
        # small forwards, all at once on a machine's cores)
        self.admit_s = admit_s
        self._executor = executor
        self._requests: dict[str, RequestState] = {}
        self._queue: list[_Job] = []
        self._draining = False
        self._on_forward = on_forward  # called on the event loop with each forward's size
        self._group: _Group | None = None  # changed on the MLX thread only
        self._holding: list[_Job] = []  # the MLX thread's jobs out of the queue
        self._cycle = 0.0  # seconds between a request's steps here (moving average)
        self.max_batch = max_batch

    # ---------------------------------------------------------------- async API

    async def step(self, request_id: str, position: int, *, tokens: list[int] | None = None,
                   hidden: Wire | None = None, sample: Sampling | None = None) -> StepResult:
        loop = asyncio.get_running_loop()
        job = _Job(request_id, position, tokens, hidden, sample, loop.create_future(), loop)
        self._queue.append(job)
        if not self._draining:
            self._draining = True
            # started after the callbacks already due: the other steps that arrived with
            # this one (frames of one message, requests settled by one forward) are queued
            # by then and share its forward
            loop.call_soon(loop.run_in_executor, self._executor, self._drain)
        return await job.future  # a caller that goes away cancels it: the job is dropped

    def _drain(self) -> None:
        """MLX thread: run queued steps until the queue is empty. Nothing may escape: an
        engine whose drain died would leave every later step waiting forever."""
        try:
            self._drain_queue()
        except BaseException as e:  # a bug, or the loop closing under us
            if self._group is not None:  # its caches may be half-way through a forward:
                for r, st in zip(self._group.ids, self._group.states):  # its rows are lost
                    if self._requests.get(r) is st:
                        self._requests.pop(r, None)
            self._group = None
            jobs, self._holding = self._holding, []
            self._draining = False
            while jobs:
                settle_together([(job, e) for job in jobs])
                jobs, self._queue = self._queue, []  # and any that came meanwhile
            raise

    def _drain_queue(self) -> None:
        carry: list[_Job] = []  # picked for no forward yet: they go first next time
        while True:
            jobs, self._queue = self._queue, []  # list swap: atomic under the GIL
            # steps whose caller went away (a client that disconnected) are dropped: run,
            # they would make a freed request's state again
            jobs = [job for job in carry + jobs if not job.future.done()]
            self._holding = jobs
            if jobs and not carry and (self.gather_s or self.admit_s):
                # (jobs left over from the last forward go at once: the requests that just
                # ran cannot be back yet)
                jobs += self._gather(jobs)
                self._holding = jobs
            if not jobs:
                self._prune()  # rows of requests freed meanwhile
                self._draining = False
                if not self._queue:  # nothing slipped in between the check and the flag
                    return
                self._draining = True
                continue
            batch, carry = self._pick(jobs)
            if not batch:
                continue
            if len(batch) == 1:
                self._run_one(batch[0])
            else:
                self._run_batch(batch)

    def _pick(self, jobs: list[_Job]) -> tuple[list[_Job], list[_Job]]:
        """The jobs of the next forward, and those left for a later one: one step per
        request (its steps must run in order), at most max_batch of them, and prefill
        chunks only while the forward stays under PACK_TOKENS positions."""
        batch: list[_Job] = []
        rest: list[_Job] = []
        seen: set[str] = set()
        positions = 0
        for job in jobs:
            if job.future.done():  # its caller went away (while it waited to be gathered)
                continue
            size = job.size
            if not batch or (job.request_id not in seen and len(batch) < self.max_batch
                             and (size == 1 or positions + size <= PACK_TOKENS)):
                batch.append(job)
                seen.add(job.request_id)
                positions += size
            else:
                rest.append(job)
        return batch, rest

    def _gather(self, jobs: list[_Job]) -> list[_Job]:
        """Wait (bounded) for the next steps of the other requests under way here, so that
        they share one forward with whatever is queued (a new request's prefill too); or,
        when none is under way, for more new requests (admit_s)."""
        # requests that stepped here recently: their next step is on its way round the ring
        # (a decode step) or right behind (the first decode step after a prefill, the next
        # chunk of a long prompt); one whose client went away is not waited for long
        now = time.monotonic()
        recent = max(GATHER_RECENT_S, 2 * self._cycle)
        expected = {r for r, st in list(self._requests.items()) if now - st.last_used < recent}
        waiting = {j.request_id for j in jobs}
        admitting = False
        if expected:
            if expected <= waiting or not self.gather_s:
                return []
            paced = self.admit_s > 0  # the first shard sets the pace of the ring
            deadline = now + (max(self.gather_s, min(CYCLE_SHARE * self._cycle, MAX_GATHER_S))
                              if paced else self.gather_s)
        elif self.admit_s and not any(j.decode for j in jobs):
            # a burst: wait until no new request came for admit_s, at most ADMIT_ROUNDS
            # times as long in all
            admitting = True
            deadline, last_call = now + self.admit_s, now + ADMIT_ROUNDS * self.admit_s
        else:
            return []
        more: list[_Job] = []
        while (now := time.monotonic()) < deadline:
            time.sleep(0.0005)
            new, self._queue = self._queue, []
            more += new
            waiting |= {j.request_id for j in new}
            if admitting:
                if new:
                    deadline = min(now + self.admit_s, last_call)
            elif expected <= waiting:
                break
        return more

    def _run_one(self, job: _Job) -> None:
        try:
            result = self._step(job.request_id, job.position, job.tokens, job.hidden,
                                job.sample)
        except Exception as e:  # the request's own error: its caller reports it
            job.settle(error=self._failure(e))
            return
        state = self._requests.get(job.request_id)
        if state is not None:
            state.length = job.position + job.size
            state.last_used = time.monotonic()
        self._count(job, 1)
        job.settle(result)

    def _run_batch(self, jobs: list[_Job]) -> None:
        """Steps of several requests (decode steps and prefill chunks) in one forward; a
        job whose input or position is wrong fails alone, before the forward."""
        ready: list[tuple[_Job, Any, RequestState]] = []
        for job in jobs:
            try:
                h = self._input(job.tokens, job.hidden)
                ready.append((job, h, self._state(job.request_id, job.position)))
            except Exception as e:
                job.settle(error=self._failure(e))
        if len(ready) == 1:
            job = ready[0][0]
            # its cache was touched by _state only; run it the ordinary way
            self._run_one(job)
            return
        if not ready:
            return
        try:
            results = self._step_batch([job.request_id for job, _, _ in ready],
                                       [h for _, h, _ in ready], [st for _, _, st in ready],
                                       [job.sample for job, _, _ in ready])
        except Exception as e:  # a failed forward fails every request in it
            # and their caches may be part-way through it: forget them (and the group), so
            # that a later frame of theirs gets a clear error rather than wrong caches
            self._group = None
            for job, _, _ in ready:
                self._requests.pop(job.request_id, None)
            error = self._failure(e)
            settle_together([(job, error) for job, _, _ in ready])
            return
        self._count(ready[0][0], len(ready))
        now = time.monotonic()
        for (job, _, state) in ready:
            state.length, state.last_used = job.position + job.size, now
        settle_together([(job, result) for (job, _, _), result in zip(ready, results)])

    def _failure(self, error: Exception) -> Exception:
        """A forward's error as the caller should see it: ours as they are; one raised by
        the model's own code named, with the shard it ran on (never a bare INTERNAL)."""
        if isinstance(error, NodeError):
            return error
        shard = self.shard
        return ModelCodeError(
            f"{shard.source.spec}: the model's code failed running layers {shard.start}-"
            f"{shard.end} ({type(error).__name__}: {error}); the request was dropped and the "
            "node keeps serving; if it repeats, reload the model or report it")

    def _count(self, job: _Job, size: int) -> None:
        if self._on_forward is not None:
            job.loop.call_soon_threadsafe(self._on_forward, size)

    def free(self, request_id: str) -> bool:
        freed = self._requests.pop(request_id, None) is not None
        self._prune_later()
        return freed

    def free_idle(self, max_idle_s: float) -> list[str]:
        now = time.monotonic()
        # list(): the MLX thread may add a request while the event loop looks
        stale = [r for r, s in list(self._requests.items()) if now - s.last_used > max_idle_s]
        for r in stale:
            self._requests.pop(r, None)
        self._prune_later()
        return stale

    def _prune_later(self) -> None:
        """Rows of freed requests leave the group on the MLX thread (once the drain in
        progress is done), so their caches are released even if no other step comes."""
        group = self._group
        if group is not None and any(self._requests.get(r) is not st
                                     for r, st in zip(group.ids, group.states)):
            self._executor.submit(self._prune)

    def _prune(self) -> None:
        group = self._group
        if group is not None:
            self._ungroup(keep={r for r, st in zip(group.ids, group.states)
                                if self._requests.get(r) is st})

    @property
    def active_requests(self) -> int:
        return len(self._requests)

    def cache_offset(self, request_id: str) -> int:
        state = self._requests.get(request_id)
        return state.length if state else 0

    # ---------------------------------------------------------------- checks

    def check_activation(self, shape: list[int], dtype: str, position: int) -> None:
        """Validate an incoming hidden-state frame before decoding it."""
        hidden = self.shard.hidden_size
        if len(shape) != 3 or shape[0] != 1 or shape[1] < 1 or shape[2] != hidden:
            raise BadFrame(f"activation shape {list(shape)} is wrong: expected [1, L, {hidden}]")
        if dtype != self.shard.dtype:
            raise BadFrame(f"activation dtype {dtype} is wrong: this shard computes in "
                           f"{self.shard.dtype}")
        if position + shape[1] > self.shard.source.context_length:
            raise ContextOverflow(
                f"positions {position}..{position + shape[1] - 1} exceed the context length "
                f"{self.shard.source.context_length}"
            )

    # ---------------------------------------------------------------- MLX thread

    def _state(self, request_id: str, position: int) -> RequestState:
        state = self._requests.get(request_id)
        if state is None:
            if position != 0:
                raise FrameGap(
                    f"request {request_id} is unknown here and the frame starts at position "
                    f"{position}; a new request must start at 0 (was it freed after a timeout?)"
                )
            state = RequestState(self.shard.runner.make_cache())
            self._requests[request_id] = state
        elif state.length < position:
            raise FrameGap(
                f"request {request_id}: frame at position {position} but this shard's cache "
                f"holds {state.length} positions: frames were lost on the way")
        elif state.length != position:
            raise BadFrame(
                f"request {request_id}: frame at position {position} but this shard's cache "
                f"holds {state.length} positions"
            )
        now = time.monotonic()
        if state.stepped and position:  # a ring cycle: its last step here to this one
            cycle = now - state.stepped
            self._cycle = cycle if not self._cycle else 0.8 * self._cycle + 0.2 * cycle
        state.last_used = state.stepped = now
        return state

    def _input(self, tokens: list[int] | None, hidden: Wire | None) -> Any:
        """A step's input: token ids [1, L] (first shard) or a frame's hidden states
        [1, L, hidden]."""
        import mlx.core as mx

        shard = self.shard
        if tokens is not None:
            if not shard.is_first:
                raise BadFrame("token input sent to a shard that does not hold the embedding")
            vocab = int(shard.source.config["vocab_size"])
            if any(t >= vocab or t < 0 for t in tokens):
                raise BadFrame(f"token id out of range for vocabulary of {vocab}")
            if not tokens:
                raise BadFrame("a step needs at least one token")
            return mx.array(tokens, dtype=mx.int32)[None]
        if hidden is not None:
            h = decode_tensor(*hidden)
            if h.ndim != 3 or h.shape[1] < 1:
                raise BadFrame(f"hidden states of shape {list(h.shape)}: a step needs "
                               f"[1, positions >= 1, hidden]")
            return h
        raise BadFrame("a step needs either tokens or hidden states")

    def _step(self, request_id: str, position: int, tokens: list[int] | None,
              hidden: Wire | None, sample: Sampling | None) -> StepResult:
        t0 = time.perf_counter()
        x = self._input(tokens, hidden)
        state = self._state(request_id, position)
        self._ungroup_one(request_id)  # stepping alone: its own cache
        try:
            return self._finish([x.shape[1]], [state], [sample],
                                self._forward(x, state.caches, [x.shape[1]], [sample]),
                                [state.caches], t0)[0]
        except Exception:  # its caches may be part-way through: forget the request
            self._requests.pop(request_id, None)
            raise

    def _forward(self, x: Any, caches: list, lengths: list[int],
                 samples: list[Sampling | None]) -> Any:
        """The model's own forward over this shard's layers for rows of `x`; on the last
        shard only the sampled rows' last positions reach the head (a prefill chunk that
        samples nothing needs no head at all)."""
        import mlx.core as mx

        runner = self.shard.runner
        if self.shard.is_last:
            pick = mx.array([n - 1 for n in lengths]) if any(
                sm is not None for sm in samples) else mx.array([0] * len(lengths))
            return runner.forward(x, caches, pick=pick)
        return runner.forward(x, caches)

    def _finish(self, lengths: list[int], states: list[RequestState],
                samples: list[Sampling | None], out: Any, caches: list,
                t0: float) -> list[StepResult]:
        """Evaluate one forward's output: tokens for the sampled rows (last shard), or
        each row's hidden states for the next shard, already serialised."""
        import mlx.core as mx

        if self.shard.is_last:
            wanted = [k for k, sm in enumerate(samples) if sm is not None]
            drawn: dict[int, int] = {}
            if wanted:
                logits = out[mx.array(wanted), 0] if len(wanted) < len(samples) else out[:, 0]
                tokens = self._sample_rows(logits, [states[k] for k in wanted],
                                           [samples[k] for k in wanted])  # evaluates
                drawn = dict(zip(wanted, tokens))
            mx.eval([c.state for group in caches for c in group])  # prefill: caches only
            compute = time.perf_counter() - t0
            return [StepResult(None, drawn.get(k), compute) for k in range(len(lengths))]
        # (the caches too: a cache taken out of a batch is a lazy slice that would hold
        # the whole batch's tensors until its request steps again)
        mx.eval(out, [c.state for group in caches for c in group])
        compute = time.perf_counter() - t0
        return [StepResult(w, None, compute) for w in encode_rows(out, lengths)]

    def _step_batch(self, ids: list[str], inputs: list[Any], states: list[RequestState],
                    samples: list[Sampling | None]) -> list[StepResult]:
        """Several requests' steps: the decode steps (one position each) are the rows of
        the group and share one forward over mlx-lm's batch caches; the prefill chunks (and
        a decode step too long for the group) share another, right-padded as mlx-lm's
        BatchGenerator pads prompts (each chunk's caches merged for it and taken back
        after). Both forwards are evaluated together."""
        import mlx.core as mx

        t0 = time.perf_counter()
        rows = [i for i, h in enumerate(inputs) if h.shape[1] == 1]
        chunks = [i for i, h in enumerate(inputs) if h.shape[1] != 1]
        # a decode step whose cache is much longer than the others' steps with the chunks:
        # in the group every row is padded to the longest (mlx-lm's BatchKVCache)
        while len(rows) > 1 and not fits_padding([states[i].length for i in rows]):
            longest = max(rows, key=lambda i: states[i].length)
            rows.remove(longest)
            chunks.insert(0, longest)
        for i in chunks:
            self._ungroup_one(ids[i])
        # (a forward of chunks alone leaves the group as it is, for the next decode steps)
        group = self._regroup([ids[i] for i in rows], [states[i] for i in rows]) if rows \
            else None
        parts: list[tuple[list[int], Any, list]] = []  # (rows of inputs, output, caches)
        if group is not None:
            where = {r: k for k, r in enumerate(group.ids)}
            rows.sort(key=lambda i: where[ids[i]])  # the group's row order
            x = mx.concatenate([inputs[i] for i in rows], axis=0)
            parts.append((rows, self._forward(x, group.caches, [1] * len(rows),
                                              [samples[i] for i in rows]), [group.caches]))
        if len(chunks) == 1:
            i = chunks[0]
            parts.append(([i], self._forward(inputs[i], states[i].caches,
                                             [inputs[i].shape[1]], [samples[i]]),
                          [states[i].caches]))
        elif chunks:
            parts.append(self._chunks_forward(chunks, inputs, states, samples))
        results: dict[int, StepResult] = {}
        for which, out, caches in parts:
            done = self._finish([inputs[i].shape[1] for i in which],
                                [states[i] for i in which], [samples[i] for i in which],
                                out, caches, t0)
            results.update(zip(which, done))
        return [results[i] for i in range(len(inputs))]

    def _chunks_forward(self, which: list[int], inputs: list[Any], states: list[RequestState],
                        samples: list[Sampling | None]) -> tuple[list[int], Any, list]:
        """Prefill chunks of several requests as one forward: their caches merged into
        mlx-lm's batch caches, the inputs right-padded to the longest (`prepare` /
        `finalize` move the padding to the left, as BatchGenerator does); every request
        then gets its own caches back (`extract`)."""
        import mlx.core as mx

        lengths = [inputs[i].shape[1] for i in which]
        longest = max(lengths)
        pad = [longest - n for n in lengths]
        n_layers = len(states[which[0]].caches)
        batch = [states[which[0]].caches[layer].merge([states[i].caches[layer] for i in which])
                 for layer in range(n_layers)]
        rows = []
        for i, p in zip(which, pad):
            x = inputs[i]
            rows.append(mx.pad(x, [(0, 0), (0, p)] + [(0, 0)] * (x.ndim - 2)) if p else x)
        if max(pad):
            for cache in batch:
                cache.prepare(lengths=lengths, right_padding=pad)
        out = self._forward(mx.concatenate(rows, axis=0), batch, lengths,
                            [samples[i] for i in which])
        if max(pad):
            for cache in batch:
                cache.finalize()
        for k, i in enumerate(which):
            states[i].caches = [cache.extract(k) for cache in batch]
        return which, out, [states[i].caches for i in which]

    def _regroup(self, ids: list[str], states: list[RequestState]) -> _Group | None:
        """The group made of exactly these decode rows: rows not among them get their own
        caches back, new ones join (mlx-lm's BatchKVCache.merge / extend / filter)."""
        group = self._group
        rows = dict(zip(group.ids, group.states)) if group else {}
        # a row stays if it is this very request (an id freed and used again is not)
        self._ungroup(keep={r for r, st in zip(ids, states) if rows.get(r) is st})
        group = self._group
        held = set(group.ids) if group else set()
        new = [(r, st) for r, st in zip(ids, states) if r not in held]
        if new:
            # mlx-lm's merge of each layer's cache kind (BatchKVCache, BatchRotatingKVCache)
            merged = [new[0][1].caches[layer].merge([st.caches[layer] for _, st in new])
                      for layer in range(self.shard.end - self.shard.start + 1)]
            if group is None:
                group = self._group = _Group([], [], merged)
            else:
                for cache, more in zip(group.caches, merged):
                    cache.extend(more)
            group.ids += [r for r, _ in new]
            group.states += [st for _, st in new]
            for _, st in new:
                st.caches = []  # the group holds them now
        return group

    def _ungroup(self, keep: set[str], restore: str = "") -> None:
        """Rows not in `keep` leave the group; those of requests still held (and
        `restore`'s, held or not: a step of it is running) get their own caches back,
        copied out of the group's."""
        import mlx.core as mx

        group = self._group
        if group is None:
            return
        stay = [k for k, r in enumerate(group.ids) if r in keep]
        if len(stay) == len(group.ids):
            return
        for k, (r, state) in enumerate(zip(group.ids, group.states)):
            if r not in keep and (r == restore or self._requests.get(r) is state):
                state.caches = [cache.extract(k) for cache in group.caches]
                mx.eval([c.state for c in state.caches])  # not a view of the whole group
        if not stay:
            self._group = None
            return
        for cache in group.caches:
            cache.filter(stay)
        group.ids = [group.ids[k] for k in stay]
        group.states = [group.states[k] for k in stay]

    def _ungroup_one(self, request_id: str) -> None:
        group = self._group
        if group is not None and request_id in group.ids:
            self._ungroup(keep=set(group.ids) - {request_id}, restore=request_id)

    def _sample_rows(self, logits: Any, states: list[RequestState],
                     samples: list[Sampling]) -> list[int]:
        """One token for each row of logits [n, vocab], each with its request's sampling,
        evaluated together (one sync, not n). Greedy rows take the argmax of the logits,
        which the log-softmax would not move."""
        import mlx.core as mx

        if all(sm.temperature == 0 for sm in samples):
            return mx.argmax(logits, axis=-1).tolist()
        logprobs = row_logprobs(logits)
        drawn = [draw(st, sm, logprobs[i:i + 1])
                 for i, (st, sm) in enumerate(zip(states, samples))]
        mx.eval(drawn)
        return [int(d.item()) for d in drawn]


def row_logprobs(logits: Any) -> Any:
    """Log-probabilities of logits [..., vocab], normalised per row (as generate_step)."""
    import mlx.core as mx

    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def draw(state: RequestState, sample: Sampling, logprobs: Any) -> Any:
    """One token from log-probabilities [1, vocab] as mlx-lm's make_sampler(temp, top_p)
    draws it (its top-p filter, then a categorical draw at the temperature), but from the
    request's own random key: make_sampler draws from MLX's global key, which every
    request in a batch would advance, so a seeded request would not repeat."""
    import random

    import mlx.core as mx
    from mlx_lm.sample_utils import apply_top_p

    if sample.temperature == 0:
        return mx.argmax(logprobs, axis=-1)
    if state.key is None:  # its first token
        state.key = mx.random.key(sample.seed if sample.seed >= 0 else random.getrandbits(63))
    if 0 < sample.top_p < 1:
        logprobs = apply_top_p(logprobs, sample.top_p)
    state.key, key = mx.random.split(state.key)
    return mx.random.categorical(logprobs * (1 / sample.temperature), key=key)


def fits_padding(lengths: list[int]) -> bool:
    """Whether caches of these lengths may share one BatchKVCache: padded to the longest,
    they hold at most PAD_FACTOR times their own positions (plus one allocation step of
    256 positions per row, which every cache rounds up to anyway)."""
    return len(lengths) * max(lengths) <= PAD_FACTOR * sum(lengths) + 256 * len(lengths)
