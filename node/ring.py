"""The mlx-ring backend, node side: this node's rank in an mx.distributed ring group.

A plan with backend "mlx-ring" names one rank per node (its index in the plan) and the
port each rank's worker listens on. Every node service starts one worker process
(`python -m node.ring_worker`) with `MLX_HOSTFILE` / `MLX_RANK`, as `mlx.launch` would
over ssh: the node services are the launcher. LoadShard returns once the worker has
formed the group and loaded its part, or fails after `join_timeout_s` naming what went
wrong. Rank 0's node serves Generate: it validates and tokenises the request, hands it to
its worker and streams the tokens back with the same events, timings and metrics as the
gRPC pipeline.

A worker that exits (a peer died, so MLX's ring failed it, or it was killed) marks the
group down with the reason; the coordinator on rank 0 notices dead nodes by heartbeat
and, with --auto-reform, forms a new group on the survivors (node/coordinator.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import signal
import socket
import sys
import tempfile
import time
from collections import deque
from collections.abc import AsyncIterator, Callable

import grpc
import psutil

from node.errors import BadFrame, ModelError, NodeError
from node.metrics import NodeMetrics
from node.models import ModelSource
from node.peers import PeerChannels
from node.runner import serve_request
from protos import cluster_pb2 as pb
from protos import cluster_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
JOIN_TIMEOUT_S = 120.0  # form the group and load the model
STOP_GRACE_S = 2.0
WAKE_TRIES = 50  # x 0.1 s: how long a rank may still be finishing its load


class RingDown(NodeError):
    """The ring group lost a rank (or its worker): MLX's groups do not survive that."""

    code = "FAILED_PRECONDITION"  # not "UNAVAILABLE": this node answers, its group is gone


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free now on `host`, for this node's ring worker to listen on later; 0 when
    none can be found (the node still serves; an mlx-ring plan then needs --ring-port)."""
    try:
        family = socket.getaddrinfo(host or None, 0, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            return s.getsockname()[1]
    except OSError:
        return 0


def hostfile(plan: pb.Plan) -> list[list[str]]:
    """MLX's ring hostfile: one [ip:port] per rank, in plan order."""
    return [[f"{s.address.rsplit(':', 1)[0]}:{s.ring_port}"] for s in plan.shards]


class RingGroup:
    """One worker process, its state, and (on rank 0) the requests it serves."""

    def __init__(self, node_id: str, plan: pb.Plan, options: pb.ModelOptions,
                 source: ModelSource, tokenizer, metrics: NodeMetrics,
                 request_timeout_s: float = 120.0,
                 on_down: Callable[[RingGroup], None] | None = None,
                 metadata: tuple[tuple[str, str], ...] = (),
                 peers: PeerChannels | None = None) -> None:
        self.plan = plan
        self.epoch = plan.epoch
        self.options = options
        self.source = source
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.request_timeout_s = request_timeout_s
        self.on_down = on_down
        ids = [s.node_id for s in plan.shards]
        self.rank = ids.index(node_id)
        self.size = len(ids)
        self.parallel = plan.parallel or "tensor"
        self.mine = plan.shards[self.rank]
        self.is_first = self.rank == 0
        self.entry_address = plan.shards[0].address
        self.state = "starting"
        self.error = ""
        self.formed_s = 0.0
        self.weight_bytes = 0
        self.dtype = ""
        self.load_seconds = 0.0
        self.mlx_active = 0
        self.proc: asyncio.subprocess.Process | None = None
        self._ps: psutil.Process | None = None
        self._hostfile = ""
        self._ready: asyncio.Future | None = None
        self.pending: dict[str, asyncio.Queue] = {}
        self._tasks: list[asyncio.Task] = []
        self._stderr: deque[str] = deque(maxlen=20)
        self._closing = False
        self._stopping: asyncio.Task | None = None  # mark_down's close, kept referenced
        self._metadata = metadata
        self._peers = peers or PeerChannels()

    # ------------------------------------------------------------ lifecycle

    async def start(self, join_timeout_s: float = JOIN_TIMEOUT_S) -> None:
        """Start the worker; return when it has formed the group and loaded its part."""
        loop = asyncio.get_running_loop()
        fd, self._hostfile = tempfile.mkstemp(prefix="mlx-ring-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(hostfile(self.plan), f)
        cfg = {"model": self.plan.model, "dtype": self.options.dtype,
               "layers": self.options.layers, "parallel": self.parallel,
               "start": self.mine.start_layer, "end": self.mine.end_layer}
        env = dict(os.environ, MLX_HOSTFILE=self._hostfile, MLX_RANK=str(self.rank))
        self._ready = loop.create_future()
        t0 = time.monotonic()
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "node.ring_worker", json.dumps(cfg),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=env)
        self._ps = psutil.Process(self.proc.pid)
        self._tasks = [loop.create_task(self._read_events()),
                       loop.create_task(self._read_stderr())]
        try:
            await asyncio.wait_for(asyncio.shield(self._ready), join_timeout_s)
        except TimeoutError:
            others = [f"rank {i} {s.name or s.address} (port {s.ring_port})"
                      for i, s in enumerate(self.plan.shards) if i != self.rank]
            stage = "to load the model" if self.formed_s else "for the group to form"
            await self.close(f"no ready group after {join_timeout_s:.0f} s")
            raise RingDown(
                f"rank {self.rank} waited {time.monotonic() - t0:.0f} s {stage}; check that "
                f"every node loaded this plan and these ranks are reachable: "
                f"{', '.join(others)}") from None
        except NodeError:
            await self.close("the worker failed to start")
            raise
        except asyncio.CancelledError:  # the load was abandoned: leave no worker behind
            self._closing = True
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            raise
        self.state = "ready"

    async def close(self, reason: str = "the plan was replaced") -> None:
        """Stop the worker (politely, then by force) and fail what it was serving."""
        self._closing = True
        if self.state not in ("down",):
            self.state = "stopped"
        self._fail_pending(RingDown(f"request aborted: {reason}"))
        proc = self.proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), STOP_GRACE_S)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        for task in self._tasks:
            task.cancel()
        if self._hostfile:
            with contextlib.suppress(OSError):
                os.unlink(self._hostfile)

    # ------------------------------------------------------------ worker output

    async def _read_events(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        try:
            while line := await self.proc.stdout.readline():
                try:
                    event = json.loads(line)
                except ValueError:
                    log.info("ring worker: %s", line.decode(errors="replace").rstrip())
                    continue
                self._event(event)
            code = await self.proc.wait()
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the pipe broke: treat as the worker gone
            log.exception("ring worker output")
            code = -1
            self.error = self.error or repr(e)
        self._worker_exited(code)

    def _event(self, event: dict) -> None:
        kind = event.get("ev")
        if kind == "tok":
            queue = self.pending.get(event.get("id", ""))
            if queue is not None:
                queue.put_nowait((int(event["tok"]), float(event["c"]), float(event["lp"])))
            self.metrics.observe("step_compute", float(event["c"]))
        elif kind == "step":
            self.metrics.observe("step_compute", float(event["c"]))
        elif kind == "end":
            self.mlx_active = int(event.get("active", self.mlx_active))
            queue = self.pending.get(event.get("id", ""))
            if queue is not None:
                queue.put_nowait(None)
        elif kind == "formed":
            self.formed_s = float(event["seconds"])
            log.info("ring group formed: rank %d of %d in %.2f s", event["rank"], event["size"],
                     self.formed_s)
        elif kind == "ready":
            self.weight_bytes = int(event["weight_bytes"])
            self.dtype = str(event["dtype"])
            self.load_seconds = float(event["load_seconds"])
            self.mlx_active = int(event["active"])
            if self._ready is not None and not self._ready.done():
                self._ready.set_result(True)
        elif kind == "error":
            self.error = str(event.get("msg", "unknown error"))
            if self._ready is not None and not self._ready.done():
                cls = RingDown if "group" in self.error else ModelError
                self._ready.set_exception(cls(f"rank {self.rank}: {self.error}"))

    async def _read_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            text = line.decode(errors="replace").rstrip()
            self._stderr.append(text)
            log.info("ring worker: %s", text)

    def _worker_exited(self, code: int) -> None:
        was = self.state
        if self._closing:
            return
        self.state = "down"
        tail = next((t for t in reversed(self._stderr) if t.strip()), "")
        self.error = self.error or f"the ring worker exited with status {code}" + (
            f": {tail}" if tail else "")
        log.warning("ring group down (rank %d, was %s): %s", self.rank, was, self.error)
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(RingDown(f"rank {self.rank}: {self.error}"))
        self._fail_pending(RingDown(f"the ring group is down: {self.error}"))
        if self.on_down is not None:
            self.on_down(self)

    def _fail_pending(self, error: Exception) -> None:
        for queue in self.pending.values():
            queue.put_nowait(error)

    def mark_down(self, reason: str) -> None:
        """A rank is gone: the group cannot go on (MLX's rule). The worker is stopped (it
        holds the weights) and the state stays "down" with the reason until a new plan."""
        if self.state != "down":
            self.error = reason
            self._worker_exited(-1)
            self._stopping = asyncio.get_running_loop().create_task(self.close(reason))

    # ------------------------------------------------------------ requests (rank 0)

    patient_first_token = True  # the worker serves one request at a time

    @property
    def active_requests(self) -> int:
        return len(self.pending)

    @property
    def held_bytes(self) -> int:
        return self.mlx_active  # the weights live in the worker process

    def free_idle(self, max_idle_s: float) -> list[str]:
        return []  # the worker holds one request's caches at a time and frees them itself

    def handle_frame(self, frame: pb.ForwardFrame, replies: asyncio.Queue) -> None:
        raise BadFrame("this node serves an mlx-ring plan: activations travel inside the "
                       "MLX group, not over Forward")

    def _send(self, message: dict) -> None:
        if self.proc is None or self.proc.stdin is None or self.state == "down":
            raise RingDown(f"the ring group is down: {self.error or 'no worker'}")
        self.proc.stdin.write((json.dumps(message) + "\n").encode())

    def generate(self, request: pb.GenerateRequest, already: list[int] = (),
                 emitted_chars: int = 0) -> AsyncIterator[pb.GenerateEvent]:
        """Serve one request through the group (rank 0 only; node/runner.py's loop, with
        this backend). After a fail-over the tokens the client already has are part of
        the prompt, and generation continues."""
        assert self.tokenizer is not None
        return serve_request(self, request, already, emitted_chars)

    async def begin(self, request_id: str, prompt: list[int], already: list[int],
                    request: pb.GenerateRequest, budget: int, reuse: bool = True) -> None:
        sampling = request.sampling
        # the worker draws from a key made from the seed, as the engine does (node/sampling)
        seed = sampling.seed if sampling.HasField("seed") and sampling.seed >= 0 else (
            random.getrandbits(63))  # every rank must draw alike: rank 0 picks the seed
        # shielded: once a rank is woken, rank 0 must take part in the collective too
        await asyncio.shield(self._start_request({
            "op": "gen", "id": request_id, "tokens": prompt + already, "max": budget,
            "temp": sampling.temperature, "top_p": sampling.top_p, "seed": seed,
            "eos": sorted(self.tokenizer.eos_ids), "ignore_eos": request.ignore_eos}))
        if self.state in ("ready", "serving"):  # it may have gone down meanwhile
            self.state = "serving"

    def next(self, request_id: str, token: int, position: int,
             sampling: pb.SamplingParams) -> None:
        return None  # the worker feeds its tokens back in itself

    def end(self, request_id: str, finished: bool) -> None:
        """A request that ran to its end was ended by the worker too (same rule: max tokens
        or end of sequence); any other is cancelled there."""
        if not self.pending and self.state == "serving":
            self.state = "ready"
        if not finished and self.state != "down":
            with contextlib.suppress(NodeError, OSError):
                self._send({"op": "cancel", "id": request_id})

    async def _start_request(self, message: dict) -> None:
        """Wake every other rank (through its node service), then hand rank 0 the request.
        A rank that cannot be woken breaks the group: this worker stops, so the others'
        collectives fail instead of waiting for a partner that never comes."""
        wake = pb.RingWakeRequest(epoch=self.epoch)

        async def wake_one(channel: grpc.aio.Channel) -> None:
            stub = pb_grpc.NodeServiceStub(channel)
            for _ in range(WAKE_TRIES):  # a rank whose service is finishing its load
                try:
                    await stub.RingWake(wake, timeout=5.0, metadata=self._metadata)
                    return
                except grpc.aio.AioRpcError as e:
                    if e.code() != grpc.StatusCode.ABORTED:
                        raise
                    await asyncio.sleep(0.1)
            raise RingDown(f"rank still loading after {WAKE_TRIES * 0.1:.0f} s")

        results = await asyncio.gather(*(wake_one(self._peers.get(s.address))
                                         for s in self.plan.shards[1:]),
                                       return_exceptions=True)
        failed = [f"rank {i} {s.name or s.address}: "
                  f"{r.details() if isinstance(r, grpc.aio.AioRpcError) else r}"
                  for i, (s, r) in enumerate(zip(self.plan.shards[1:], results), start=1)
                  if isinstance(r, BaseException)]
        if failed:
            self.mark_down("could not wake " + "; ".join(failed))
            await self.close("a rank could not be woken")
            raise RingDown(f"the ring group is down: {self.error}")
        self._send(message)

    def wake(self) -> None:
        """Rank > 0: rank 0 is about to share a request; join the group's collectives."""
        if self.rank == 0:
            raise BadFrame("rank 0 is woken by requests, not by RingWake")
        self._send({"op": "wake"})

    # ------------------------------------------------------------ reporting

    def worker_info(self) -> pb.RingWorker:
        rss = 0
        if self._ps is not None and self.state != "down":
            with contextlib.suppress(psutil.Error):
                rss = self._ps.memory_info().rss
        return pb.RingWorker(parallel=self.parallel, rank=self.rank, size=self.size,
                             state=self.state, pid=self.proc.pid if self.proc else 0,
                             error=self.error, formed_s=self.formed_s, rss_bytes=rss,
                             mlx_active_bytes=self.mlx_active)

    def shard_info(self) -> pb.ShardInfo:
        return pb.ShardInfo(model=self.plan.model, start_layer=self.mine.start_layer,
                            end_layer=self.mine.end_layer, n_layers=self.plan.n_layers,
                            epoch=self.epoch, dtype=self.dtype,
                            form=self.source.form or self.dtype,
                            weight_bytes=self.weight_bytes,
                            context_length=self.source.context_length,
                            load_seconds=self.load_seconds, ring=self.worker_info())

