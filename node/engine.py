"""The scheduler of one shard: which requests' steps run together, and when.

All MLX work happens on one dedicated thread (MLX arrays and streams are not meant to be
shared across threads mid-computation), so the node's event loop keeps serving heartbeats
and other RPCs while a layer computes. Everything else happens on the event loop: steps
queue there, the gather and admission windows are event-loop timers, and the next forward
is chosen there. The MLX thread only runs forwards (node/batch.py), never waits.

Continuous batching: each time the MLX thread is free the scheduler takes what is queued
and runs the steps of different requests (decode steps and prefill chunks) as one forward,
so the weights are read once for all of them. A request joins or leaves between two
forwards. Every tuning knob is in `Tuning`.

Micro-batches: in a plan of several shards a request belongs to one of K decode groups
(the first shard chooses, node/pipeline.py; every frame says which). A forward runs the
steps of one group only, so while one group's steps travel to the other shards, this one
computes another's: K groups keep K shards busy at once, where one batch would leave all
but one waiting. Each group has its own gather window, and no window waits for another
group: the scheduler runs whichever group may go first, in the order their steps came.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

from node.batch import ShardBatch, Step, StepResult
from node.models import Shard
from node.sampling import Sampling
from node.steps import check_activation
from node.wire import Wire


def _on_loop(loop: asyncio.AbstractEventLoop, callback: Callable[[Future], None],
             done: Future) -> None:
    """A forward's end, on the MLX thread: hand its future to the event loop (unless the
    node is shutting down and the loop is gone)."""
    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
        loop.call_soon_threadsafe(callback, done)


@dataclass(frozen=True)
class Tuning:
    """The scheduler's knobs, in one place.

    In a multi-node plan a shard waits a little for the next steps of every request under
    way, so that requests travel the ring together in one batch (without it they settle
    into several small waves that never meet). The first shard sets the pace of the ring:
    it waits longer, up to a share of the measured ring cycle, so that two waves of
    requests that started apart merge within a cycle; the others only let the burst their
    upstream sent arrive. And the first shard, when no request is under way, lets a burst
    of new requests arrive until none came for `admit_s`, so that they prefill as one
    forward and then decode as one wave (started one by one, each shard would run them in
    several small forwards)."""

    gather_first_s: float = 0.25  # the first shard's wait for the requests under way
    gather_next_s: float = 0.02  # the other shards' wait
    # a shard alone: its requests' next steps come back within a millisecond of a forward;
    # without this short wait, the requests queued meanwhile would run without them, and
    # two halves of the requests would take turns forever, each in half a batch
    gather_alone_s: float = 0.005
    admit_s: float = 0.01  # the quiet time that ends a burst of new requests
    admit_rounds: int = 5  # a burst is admitted for at most this many admit_s
    gather_recent_s: float = 1.0  # a request is waited for if it stepped this recently
    cycle_share: float = 0.5  # ... or within two cycles; the first shard waits this share
    max_gather_s: float = 2.0  # of a cycle at most, and never longer than this
    pack_tokens: int = 2048  # prefill positions packed into one forward beside decode steps
    # while other requests are under way, a long prompt goes in chunks under a per-forward
    # token budget of busy_per_row per decode row in flight (at least busy_tokens): the
    # chunk is the budget less those rows, so a forward that carries one (beside their
    # steps, or between them) costs about two decode steps, not a whole prompt's prefill
    busy_tokens: int = 16
    busy_per_row: int = 2
    pad_factor: float = 2.0  # a decoding group's padding may at most double its KV cache
    max_batch: int = 64  # steps in one forward


TUNING = Tuning()


def windows(first: bool, alone: bool, tuning: Tuning = TUNING) -> tuple[float, float]:
    """(gather_s, admit_s) for a shard's place in its plan."""
    if alone:
        return tuning.gather_alone_s, 0.0
    return (tuning.gather_first_s, tuning.admit_s) if first else (tuning.gather_next_s, 0.0)


@dataclass
class _Job:
    """One request's step, waiting for a forward."""

    step: Step
    future: asyncio.Future

    @property
    def request_id(self) -> str:
        return self.step.request_id

    @property
    def group(self) -> int:
        return self.step.group


@dataclass
class _Window:
    """A wait in progress: for the requests in `expected`, or (admitting) for a burst of
    new requests to end."""

    expected: set[str]
    admitting: bool
    last_call: float  # admitting: the latest the burst may end
    timer: asyncio.TimerHandle
    expired: bool = False


class Engine:
    """Holds a Shard and schedules the steps of its requests on the MLX thread."""

    def __init__(self, shard: Shard, executor: ThreadPoolExecutor,
                 on_forward: Callable[..., None] | None = None,
                 gather_s: float = 0.0, admit_s: float = 0.0, tuning: Tuning = TUNING,
                 prompt_cache_bytes: int = 0) -> None:
        self.shard = shard
        self.batch = ShardBatch(shard, tuning.pad_factor, prompt_cache_bytes)
        self.tuning = tuning
        self.gather_s = gather_s
        self.admit_s = admit_s
        self.max_batch = tuning.max_batch
        self._executor = executor
        # called with each forward's size (the batch size) and its micro-batch
        self._on_forward = on_forward
        self._queue: list[_Job] = []  # steps waiting, in arrival order (leftovers first)
        self._carried: set[int] = set()  # groups with steps a forward had no room for
        # (request, group): a prompt chunk ran in the group's bubble since its last forward
        self._bubbled: set[tuple[str, int]] = set()
        self._running = False  # a forward is on the MLX thread
        self._kick_due = False
        self._windows: dict[int, _Window] = {}  # each group's wait in progress
        self.busy_s = 0.0  # seconds the MLX thread spent on forwards (busy fraction)
        self.last_forward_s = 0.0  # the latest forward's time (one runs at a time)

    # ---------------------------------------------------------------- async API

    async def step(self, request_id: str, position: int, *, tokens: list[int] | None = None,
                   hidden: Wire | None = None, sample: Sampling | None = None,
                   prompt: list[int] | None = None, group: int = 0) -> StepResult:
        return await self.submit(request_id, position, tokens=tokens, hidden=hidden,
                                 sample=sample, prompt=prompt, group=group)

    def submit(self, request_id: str, position: int, *, tokens: list[int] | None = None,
               hidden: Wire | None = None, sample: Sampling | None = None,
               prompt: list[int] | None = None, group: int = 0) -> asyncio.Future:
        """Queue a step of micro-batch `group` now; its future gets the result. A caller
        that goes away cancels the future: the job is dropped."""
        loop = asyncio.get_running_loop()
        state = self.batch.requests.get(request_id)
        if state is not None and state.group != group:
            # it moved to another group (the first shard evens them out): the windows of
            # the group it left wait for it no longer
            state.group = group
            self._unexpect({request_id}, but=group)
        job = _Job(Step(request_id, position, tokens, hidden, sample, prompt, group),
                   loop.create_future())
        self._queue.append(job)
        if not self._kick_due:
            # after the callbacks already due: the other steps that arrive with this one
            # (frames of one message, requests settled by one forward) queue first and
            # share its forward
            self._kick_due = True
            loop.call_soon(self._kick)
        return job.future

    def _kick(self) -> None:
        """Start the next forward if the MLX thread is free and the queued steps may go."""
        self._kick_due = False
        if self._running:
            return  # the forward's end kicks again
        self._queue = [job for job in self._queue if not job.future.done()]
        queued = dict.fromkeys(job.group for job in self._queue)  # in arrival order
        for g in list(self._windows):
            if g not in queued:
                self._close_window(g)
        # first come, first served: the first group whose steps may go runs; a group with
        # steps left over from its last forward comes after the others (a backlog of one
        # request's prompt chunks would otherwise hold every other group back)
        order = sorted(queued, key=lambda g: g in self._carried)
        g = next((g for g in order if self._may_go(g)), None)
        if g is None:
            g = self._bubble_group()
            if g is None:
                return  # a timer, or the next step to arrive, kicks again
            batch, _ = self._pick([job for job in self._queue
                                   if job.group == g and not job.step.decode])
            self._bubbled.update((job.request_id, g) for job in batch)
        else:
            self._close_window(g)
            # a request whose chunk ran in the group's bubble waits for the next one: one
            # chunk per round of the group, not one beside its steps as well
            jobs = [job for job in self._queue if job.group == g]
            riders = [job for job in jobs
                      if job.step.decode or (job.request_id, g) not in self._bubbled]
            batch, rest = self._pick(riders or jobs)
            self._bubbled = {(r, h) for r, h in self._bubbled if h != g}
            self._carried.discard(g)
            if rest:
                self._carried.add(g)
        taken = set(map(id, batch))
        self._queue = [job for job in self._queue if id(job) not in taken]
        self._running = True
        loop = asyncio.get_running_loop()
        # from the MLX thread straight to _ran, in the loop turn it wakes: run_in_executor
        # would go through an asyncio future and call _ran a turn later, every forward
        done = self._executor.submit(self._timed, [j.step for j in batch])
        done.add_done_callback(partial(_on_loop, loop, partial(self._ran, batch)))

    def _timed(self, steps: list) -> list:
        """MLX thread: one forward, its time added to `busy_s`."""
        t0 = time.perf_counter()
        try:
            return self.batch.run(steps)
        finally:
            self.last_forward_s = time.perf_counter() - t0
            self.busy_s += self.last_forward_s

    def _ran(self, jobs: list[_Job], done: Future) -> None:
        """On the event loop: a forward ended; deliver its steps' outcomes together (their
        requests carry on together: their frames leave as one message), then go on."""
        self._running = False
        try:
            outcomes = done.result()
        except BaseException as e:  # a bug in the batch code: its caches cannot be trusted
            self.batch.lost([job.request_id for job in jobs])
            outcomes = [e] * len(jobs)
        served = sum(not isinstance(o, BaseException) for o in outcomes)
        if served and self._on_forward is not None:
            self._on_forward(served, jobs[0].group, self.last_forward_s)
        for job, outcome in zip(jobs, outcomes):
            if job.future.done():
                continue  # the request went away meanwhile
            if isinstance(outcome, BaseException):
                job.future.set_exception(outcome)
            else:
                job.future.set_result(outcome)
        if self.batch.stale_rows():
            self._executor.submit(self.batch.prune)
        self._kick()

    def _pick(self, jobs: list[_Job]) -> tuple[list[_Job], list[_Job]]:
        """The jobs of the next forward, and those left for a later one: one step per
        request (its steps must run in order), at most max_batch of them, and prefill
        chunks only while the forward stays under pack_tokens positions."""
        batch: list[_Job] = []
        rest: list[_Job] = []
        seen: set[str] = set()
        positions = 0
        for job in jobs:
            size = job.step.size
            if not batch or (job.request_id not in seen and len(batch) < self.max_batch
                             and (size == 1 or positions + size <= self.tuning.pack_tokens)):
                batch.append(job)
                seen.add(job.request_id)
                positions += size
            else:
                rest.append(job)
        return batch, rest

    def _bubble_group(self) -> int | None:
        """A group whose prompt chunks may run alone now: one whose window waits for its
        decode steps to come back round the ring. The chunks fill the time those steps
        spend on the other shards, instead of making them wait here for a bigger forward
        (a window for a burst of new requests holds its prefills: they go as one)."""
        return next((job.group for job in self._queue if not job.step.decode
                     and (w := self._windows.get(job.group)) is not None and not w.admitting
                     and job.request_id in self.batch.requests), None)

    def chunk_tokens(self, request_id: str) -> int:
        """Prompt positions for a request's next prefill chunk under the per-forward
        token budget (`Tuning.busy_tokens`): 0 (no limit) when no other request is under
        way on this shard."""
        rows = len(self.batch.requests) - (request_id in self.batch.requests)
        if rows <= 0:
            return 0
        t = self.tuning
        return max(1, max(t.busy_tokens, t.busy_per_row * rows) - rows)

    # ---------------------------------------------------------------- waiting

    def _may_go(self, g: int) -> bool:
        """Whether the queued steps of group `g` may run now. If not, a window is open for
        the group: its timer (or the step that completes it) kicks again. Steps left over
        from the group's last forward go at once: the requests that just ran cannot be back
        yet."""
        if g in self._carried or not (self.gather_s or self.admit_s):
            return True
        loop = asyncio.get_running_loop()
        now = loop.time()
        queued = [job for job in self._queue if job.group == g]
        waiting = {job.request_id for job in queued}
        window = self._windows.get(g)
        if window is not None:
            if window.expired:
                return True
            if window.admitting:  # a new request came: the burst goes on
                self._arm(g, min(now + self.admit_s, window.last_call) - now)
                return False
            return window.expected <= waiting
        # the group's requests that stepped here recently: their next step is on its way
        # round the ring (a decode step) or right behind (the first decode step after a
        # prefill, the next chunk of a long prompt)
        t = self.tuning
        expected = self.batch.recent(max(t.gather_recent_s, 2 * self.batch.cycle), g)
        if expected:
            if expected <= waiting or not self.gather_s:
                return True
            paced = self.admit_s > 0  # the first shard sets the pace of the ring
            wait = (max(self.gather_s, min(t.cycle_share * self.batch.cycle, t.max_gather_s))
                    if paced else self.gather_s)
            self._open_window(g, expected, False, 0.0, wait)
        elif self.admit_s and not any(job.step.decode for job in queued):
            self._open_window(g, set(), True, now + t.admit_rounds * self.admit_s,
                              self.admit_s)
        else:
            return True
        return False

    def _open_window(self, g: int, expected: set[str], admitting: bool, last_call: float,
                     wait: float) -> None:
        timer = asyncio.get_running_loop().call_later(wait, self._expire, g)
        self._windows[g] = _Window(expected, admitting, last_call, timer)

    def _arm(self, g: int, wait: float) -> None:
        window = self._windows[g]
        window.timer.cancel()
        window.timer = asyncio.get_running_loop().call_later(max(0.0, wait), self._expire, g)

    def _expire(self, g: int) -> None:
        if g in self._windows:
            self._windows[g].expired = True
        self._kick()

    def _close_window(self, g: int) -> None:
        window = self._windows.pop(g, None)
        if window is not None:
            window.timer.cancel()

    # ---------------------------------------------------------------- requests

    async def adopt(self, request_id: str, prompt: list[int]) -> int:
        """First shard: start a request with the longest cached prefix of its prompt (on the
        MLX thread, between forwards); returns the positions it reuses."""
        if not self.batch.prompts.enabled:
            return 0
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.batch.adopt, request_id, prompt)

    def drop_prompts(self) -> None:
        """Free the prefix cache for good (on the MLX thread, after the forward in
        progress): the plan is gone."""
        self._executor.submit(self.batch.drop_prompts)

    def free(self, request_id: str) -> bool:
        freed = self.batch.free(request_id)
        self._bubbled = {e for e in self._bubbled if e[0] != request_id}
        self._prune_later()
        self._unexpect({request_id})
        return freed

    def free_idle(self, max_idle_s: float) -> list[str]:
        stale = self.batch.free_idle(max_idle_s)
        self._prune_later()
        self._unexpect(set(stale))
        return stale

    def _unexpect(self, request_ids: set[str], but: int | None = None) -> None:
        """Requests that ended will not step again (or, moved, not in the windows of groups
        other than `but`): a window that waits for them waits no longer (without this, the
        requests still under way lost a whole gather window, 0.25 s on the first shard, each
        time one of them finished before the others)."""
        touched = False
        for g, window in self._windows.items():
            if g != but and not window.admitting and window.expected & request_ids:
                window.expected -= request_ids
                touched = True
        if touched and not self._kick_due:
            self._kick_due = True
            asyncio.get_running_loop().call_soon(self._kick)

    def _prune_later(self) -> None:
        """Rows of freed requests leave the group on the MLX thread (after the forward in
        progress), so their caches are released even if no other step comes."""
        if self.batch.stale_rows():
            self._executor.submit(self.batch.prune)

    @property
    def active_requests(self) -> int:
        return len(self.batch.requests)

    def cache_offset(self, request_id: str) -> int:
        return self.batch.cache_offset(request_id)

    def check_activation(self, shape: list[int], dtype: str, position: int) -> None:
        check_activation(self.shard, shape, dtype, position)
