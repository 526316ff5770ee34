"""One shard's steps for many requests: each request's KV caches, the decode group, and
the model's own forward over them. Runs on the node's MLX thread only (node/engine.py
schedules it).

Every forward is the model's own mlx-lm code over the shard's layers (node/shardrun.py),
with mlx-lm's caches: a request alone keeps its own, requests that decode together share
mlx-lm's batch caches (`BatchKVCache`, `BatchRotatingKVCache`: merge, extend, filter,
extract). A shard keeps one such decode group per micro-batch (the frames say which a
request belongs to), so that a forward of one group leaves the others' caches as they are
and taking turns copies no KV. Prefill chunks of several requests share one right-padded forward as
mlx-lm's `BatchGenerator` pads prompts. Sampling is `generate_step`'s (logits of the last
position, log-softmax, then the sampler; node/sampling.py), so a split model gives the
same tokens as the whole one.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any

from node.errors import BadFrame, FrameGap, ModelCodeError, NodeError
from node.models import Shard
from node.prompts import PromptStore
from node.sampling import RequestSampler, Sampling, sample_rows
from node.steps import Group, RequestState, Step, StepResult, fits_padding
from node.wire import Wire, decode_tensor, encode_rows

log = logging.getLogger(__name__)


class ShardBatch:
    """The request states of one shard and the forwards over them. `run` is called on the
    MLX thread; `free`, `free_idle`, `stale_rows` and the read-only views may be called on
    the event loop (they only remove entries or read)."""

    def __init__(self, shard: Shard, pad_factor: float = 2.0,
                 prompt_cache_bytes: int = 0) -> None:
        self.shard = shard
        self.pad_factor = pad_factor  # a decoding group's padding may at most scale its KV
        self.prompts = PromptStore(prompt_cache_bytes)
        self._retiring: deque[RequestState] = deque()  # ended; their KV goes to `prompts`
        self.requests: dict[str, RequestState] = {}
        self.groups: dict[int, Group] = {}  # each micro-batch's decode group
        self.cycle = 0.0  # seconds between a request's steps here (moving average)

    # ---------------------------------------------------------------- MLX thread

    def run(self, steps: list[Step]) -> list[StepResult | Exception]:
        """The steps of one forward (one per request); each gets its result or its own
        error. A step whose input or position is wrong fails alone, before the forward; a
        failed forward fails every step in it."""
        if len(steps) == 1:
            return [self._run_one(steps[0])]
        out: list[StepResult | Exception | None] = [None] * len(steps)
        ready: list[tuple[int, Any, RequestState]] = []
        for k, step in enumerate(steps):
            try:
                h = self._input(step.tokens, step.hidden)
                ready.append((k, h, self._state(step.request_id, step.position,
                                                step.prompt, step.group)))
            except Exception as e:
                out[k] = self.failure(e)
        if len(ready) == 1:  # its cache was touched by _state only: run it the ordinary way
            k = ready[0][0]
            out[k] = self._run_one(steps[k])
        elif ready:
            try:
                results = self._step_batch([steps[k].request_id for k, _, _ in ready],
                                           [h for _, h, _ in ready], [st for _, _, st in ready],
                                           [steps[k].sample for k, _, _ in ready],
                                           steps[ready[0][0]].group)
            except Exception as e:
                # their caches may be part-way through the forward: forget them (and the
                # group), so that a later frame of theirs gets a clear error, not wrong caches
                self.lost([steps[k].request_id for k, _, _ in ready])
                error = self.failure(e)
                for k, _, _ in ready:
                    out[k] = error
            else:
                now = time.monotonic()
                for (k, _, state), result in zip(ready, results):
                    state.length, state.last_used = steps[k].position + steps[k].size, now
                    out[k] = result
        return out  # type: ignore[return-value]

    def _run_one(self, step: Step) -> StepResult | Exception:
        try:
            result = self._step(step)
        except Exception as e:  # the request's own error: its caller reports it
            return self.failure(e)
        state = self.requests.get(step.request_id)
        if state is not None:
            state.length = step.position + step.size
            state.last_used = time.monotonic()
        return result

    def lost(self, request_ids: list[str]) -> None:
        """A forward failed part-way: these requests' caches (and those of the groups they
        were in) are gone."""
        ids = set(request_ids)
        for g, group in list(self.groups.items()):
            if ids.isdisjoint(group.ids):
                continue
            del self.groups[g]
            for r, st in zip(group.ids, group.states):
                if self.requests.get(r) is st:
                    self.requests.pop(r, None)
        for r in request_ids:
            self.requests.pop(r, None)

    def adopt(self, request_id: str, prompt: list[int]) -> int:
        """First shard, before a request's first step: start it with the longest cached
        prefix of its prompt; returns the positions reused (its first step's position)."""
        caches, reused = self.prompts.adopt(prompt)
        self.requests[request_id] = RequestState(caches or self.shard.runner.make_cache(),
                                                 length=reused, prompt=list(prompt))
        return reused

    def _state(self, request_id: str, position: int,
               prompt: list[int] | None = None, group: int = 0) -> RequestState:
        state = self.requests.get(request_id)
        if state is None:
            if position != 0 and prompt is None:
                raise FrameGap(
                    f"request {request_id} is unknown here and the frame starts at position "
                    f"{position}; a new request must start at 0 (was it freed after a timeout?)"
                )
            caches = None
            if prompt is not None:  # take the prefix the first shard reuses (or fail)
                caches, _ = self.prompts.adopt(prompt, length=position)
            state = RequestState(caches or self.shard.runner.make_cache(), length=position,
                                 prompt=prompt)
            self.requests[request_id] = state
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
            self.cycle = cycle if not self.cycle else 0.8 * self.cycle + 0.2 * cycle
        state.last_used = state.stepped = now
        state.group = group
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

    def _step(self, step: Step) -> StepResult:
        t0 = time.perf_counter()
        x = self._input(step.tokens, step.hidden)
        state = self._state(step.request_id, step.position, step.prompt, step.group)
        self._ungroup_one(step.request_id)  # stepping alone: its own cache
        try:
            return self._finish([x.shape[1]], [state], [step.sample],
                                self._forward(x, state.caches, [x.shape[1]], [step.sample]),
                                [state.caches], t0)[0]
        except Exception:  # its caches may be part-way through: forget the request
            self.requests.pop(step.request_id, None)
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
                                           [samples[k] for k in wanted],
                                           [states[k].length + lengths[k] for k in wanted])
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
                    samples: list[Sampling | None], g: int = 0) -> list[StepResult]:
        """Several requests' steps, all of micro-batch `g`: the decode steps (one position
        each) are the rows of its group and share one forward over mlx-lm's batch caches;
        the prefill chunks (and a decode step too long for the group) share another,
        right-padded as mlx-lm's BatchGenerator pads prompts (each chunk's caches merged
        for it and taken back after). Both forwards are evaluated together."""
        import mlx.core as mx

        t0 = time.perf_counter()
        rows = [i for i, h in enumerate(inputs) if h.shape[1] == 1]
        chunks = [i for i, h in enumerate(inputs) if h.shape[1] != 1]
        # a decode step whose cache is much longer than the others' steps with the chunks:
        # in the group every row is padded to the longest (mlx-lm's BatchKVCache)
        while len(rows) > 1 and not fits_padding([states[i].length for i in rows], self.pad_factor):
            longest = max(rows, key=lambda i: states[i].length)
            rows.remove(longest)
            chunks.insert(0, longest)
        for i in chunks:
            self._ungroup_one(ids[i])
        # (a forward of chunks alone leaves the group as it is, for the next decode steps)
        group = self._regroup(g, [ids[i] for i in rows], [states[i] for i in rows]) if rows \
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

    def _regroup(self, g: int, ids: list[str], states: list[RequestState]) -> Group | None:
        """Micro-batch `g`'s group made of exactly these decode rows: rows not among them
        get their own caches back, new ones join (mlx-lm's BatchKVCache.merge / extend /
        filter). A request that moved here from another group leaves that one first (its
        KV is copied once, on the move)."""
        for other, group in list(self.groups.items()):
            if other != g and not set(ids).isdisjoint(group.ids):
                self._ungroup(other, keep=set(group.ids) - set(ids), restore=ids)
        group = self.groups.get(g)
        rows = dict(zip(group.ids, group.states)) if group else {}
        # a row stays if it is this very request (an id freed and used again is not)
        self._ungroup(g, keep={r for r, st in zip(ids, states) if rows.get(r) is st})
        group = self.groups.get(g)
        held = set(group.ids) if group else set()
        new = [(r, st) for r, st in zip(ids, states) if r not in held]
        if new:
            # mlx-lm's merge of each layer's cache kind (BatchKVCache, BatchRotatingKVCache)
            merged = [new[0][1].caches[layer].merge([st.caches[layer] for _, st in new])
                      for layer in range(self.shard.end - self.shard.start + 1)]
            if group is None:
                group = self.groups[g] = Group([], [], merged)
            else:
                for cache, more in zip(group.caches, merged):
                    cache.extend(more)
            group.ids += [r for r, _ in new]
            group.states += [st for _, st in new]
            for _, st in new:
                st.caches = []  # the group holds them now
        return group

    def _ungroup(self, g: int, keep: set[str], restore: list[str] = ()) -> None:
        """Rows not in `keep` leave group `g`; those of requests still held (and those in
        `restore`, held or not: a step of theirs is running) get their own caches back,
        copied out of the group's."""
        import mlx.core as mx

        group = self.groups.get(g)
        if group is None:
            return
        stay = [k for k, r in enumerate(group.ids) if r in keep]
        if len(stay) == len(group.ids):
            return
        for k, (r, state) in enumerate(zip(group.ids, group.states)):
            if r not in keep and (r in restore or self.requests.get(r) is state):
                state.caches = [cache.extract(k) for cache in group.caches]
                mx.eval([c.state for c in state.caches])  # not a view of the whole group
        if not stay:
            del self.groups[g]
            return
        for cache in group.caches:
            cache.filter(stay)
        group.ids = [group.ids[k] for k in stay]
        group.states = [group.states[k] for k in stay]

    def _ungroup_one(self, request_id: str) -> None:
        for g, group in list(self.groups.items()):
            if request_id in group.ids:
                self._ungroup(g, keep=set(group.ids) - {request_id}, restore=[request_id])

    def _sample_rows(self, logits: Any, states: list[RequestState],
                     samples: list[Sampling], positions: list[int]) -> list[int]:
        """One token for each sampled row (evaluated), to be sequence `positions`."""
        for state, sample in zip(states, samples):
            if state.sampler is None:
                state.sampler = RequestSampler(sample)
        return sample_rows(logits, [state.sampler for state in states], positions)

    # ---------------------------------------------------------------- event loop

    def free(self, request_id: str) -> bool:
        state = self.requests.pop(request_id, None)
        if state is not None and state.prompt and self.prompts.enabled:
            self._retiring.append(state)  # `prune` caches its prompt's KV
        return state is not None

    def free_idle(self, max_idle_s: float) -> list[str]:
        now = time.monotonic()
        # list(): the MLX thread may add a request while the event loop looks
        stale = [r for r, s in list(self.requests.items()) if now - s.last_used > max_idle_s]
        for r in stale:
            self.free(r)
        return stale

    def stale_rows(self) -> bool:
        """Whether a group holds rows of requests freed since, or ended requests wait
        to be cached (`prune` does both)."""
        return bool(self._retiring) or any(
            self.requests.get(r) is not st for group in list(self.groups.values())
            for r, st in zip(group.ids, group.states))

    def prune(self) -> None:
        """MLX thread: ended requests' prompts go to the prefix cache, and rows of freed
        requests leave the group, releasing their caches."""
        while self._retiring:
            state = self._retiring.popleft()
            where = [(group, k) for group in self.groups.values()
                     for k, st in enumerate(group.states) if st is state]
            caches = [c.extract(where[0][1]) for c in where[0][0].caches] if where \
                else state.caches
            # what the caches hold (a step may have run since it was freed)
            held = getattr(caches[0], "offset", state.length) if caches else 0
            try:
                self.prompts.insert(state.prompt or [], caches, held)
            except Exception:  # a cache kind that cannot be kept: serve on without it
                log.exception("caching a prompt's KV failed")
            state.caches = []
        for g, group in list(self.groups.items()):
            self._ungroup(g, keep={r for r, st in zip(group.ids, group.states)
                                   if self.requests.get(r) is st})

    def drop_prompts(self) -> None:
        """MLX thread: the prefix cache and the ended requests waiting for it go."""
        self.prompts.close()
        self._retiring.clear()

    def recent(self, within_s: float, group: int | None = None) -> set[str]:
        """Requests (of micro-batch `group`, or any) that stepped here within the last
        `within_s` seconds."""
        now = time.monotonic()
        return {r for r, st in list(self.requests.items())
                if now - st.last_used < within_s and (group is None or st.group == group)}

    def busy_groups(self) -> int:
        """Micro-batches with requests decoding here now."""
        return sum(bool(group.ids) for group in list(self.groups.values()))

    def cache_offset(self, request_id: str) -> int:
        state = self.requests.get(request_id)
        return state.length if state else 0

    def failure(self, error: Exception) -> Exception:
        """A forward's error as the caller should see it: ours as they are; one raised by
        the model's own code named, with the shard it ran on (never a bare INTERNAL)."""
        if isinstance(error, NodeError):
            return error
        shard = self.shard
        return ModelCodeError(
            f"{shard.source.spec}: the model's code failed running layers {shard.start}-"
            f"{shard.end} ({type(error).__name__}: {error}); the request was dropped and the "
            "node keeps serving; if it repeats, reload the model or report it")
