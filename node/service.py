"""The node's gRPC service: control plane (info, load, unload, metrics, faults), the data
plane's entry (`frame`: frames from the data port or a Forward stream, handed to the plan's
runner) and the Generate entry point. node/server.py starts it, with gRPC's standard
health service and the data port (node/datalink.py) beside it.

The service serves one plan at a time, run by a `Runner` (node/runner.py): the gRPC
pipeline or an mlx-ring group; how it loads, switches and leaves plans is node/plans.py's
(a plan may load beside the one serving, and a replaced one finish its requests). What a
plan must satisfy is node/placement.py's; how
Forward streams are read, node/dataplane.py's; what Generate retries, node/failover.py's.
Every error a caller can cause is answered with a precise status and a message, and the
node keeps serving: nothing a request sends can take the process down.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import psutil

from node import PROTOCOL_VERSION, __version__, failover
from node.capabilities import capabilities, default_memory_budget
from node.coordinator import Coordinator
from node.datalink import DataServer
from node.dataplane import serve_forward
from node.errors import (
    EpochNotLoaded,
    NotLoaded,
    StaleEpoch,
)
from node.faults import FaultBook, exit_now
from node.frames import Intake
from node.membership import Joiners
from node.metrics import NodeMetrics, histogram_messages
from node.models import Shard
from node.peers import PeerChannels
from node.plan import GIB
from node.plans import PlanHolder, abort
from node.ring import free_port
from node.runner import Runner
from node.staging import Staged
from protos import cluster_pb2 as pb
from protos import cluster_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


class NodeServicer(PlanHolder, pb_grpc.NodeServiceServicer):
    def __init__(self, node_id: str, name: str, memory_budget: int | None,
                 request_timeout_s: float = 120.0, idle_request_s: float = 300.0,
                 token: str | None = None, allow_faults: bool = False,
                 peer_ca: Path | None = None, tls: bool = False, ring_port: int = 0,
                 protocol_version: int = PROTOCOL_VERSION,
                 prompt_cache_bytes: int | None = None,
                 warmup_batches: list[int] | None = None,
                 state_dir: Path | None = None) -> None:
        self.node_id = node_id
        self.protocol_version = protocol_version  # another one only in tests (node.cli)
        self.token = token
        self.peer_ca = peer_ca
        self.peers = PeerChannels(peer_ca)  # one channel per peer, for every use
        self.tls = tls
        self.faults = FaultBook(allow_faults)
        self.stop = asyncio.Event()  # set by Shutdown (and by signals in node.cli)
        self.coordinator: Coordinator | None = None
        self.state_dir = state_dir  # where the node remembers its last plan's members
        self.joiners = Joiners()  # nodes that asked to be taken into the plan
        self._staged: Staged | None = None  # a plan loaded beside the serving one
        self._draining: list[Runner] = []  # plans switched away from, finishing requests
        self._knocker: asyncio.Task | None = None  # asking a plan to take this node in
        self._knock_targets: list[str] = []  # whom it asks (node/membership.py)
        self.recoveries: list[pb.Recovery] = []
        self._epoch_changed = asyncio.Condition()
        self.recovery_error: str = ""
        self._loading_epoch = 0  # the epoch of the plan being loaded (heartbeats report it)
        self._loading_model = ""
        self.accepted_epoch = 0  # the newest epoch accepted: each is accepted once
        self.api_port = 0  # the OpenAI-compatible API's port (mlx-node serve --api-port)
        self.insecure = False  # off loopback with no token (mlx-node serve --insecure)
        self.data_port = 0  # the data port's (node/server.py starts it); 0: none
        self.data_server: DataServer | None = None
        self._recovered_at = 0.0
        self.name = name
        self.address = ""
        # fixed at start: available memory minus a margin unless the operator set one
        self.memory_budget = memory_budget if memory_budget is not None else (
            default_memory_budget())
        self.request_timeout_s = request_timeout_s
        self.prompt_cache_bytes = prompt_cache_bytes if prompt_cache_bytes is not None else (
            min(GIB, self.memory_budget // 8))
        self.idle_request_s = idle_request_s
        # batch sizes each new shard runs once at load (None: auto, node/warmup.py)
        self.warmup_batches = warmup_batches
        self.metrics = NodeMetrics()
        # frames from the upstream neighbour, by the Forward RPC or the data port
        self.frame = Intake(self)
        self.matmul_gflops = 0.0  # set by --calibrate
        self.advertising = False
        # up since the process started (imports included): a joiner's settle time counts
        # from when it was started (node/membership.py)
        self.started = time.monotonic() - max(0.0, time.time() - psutil.Process().create_time())
        # one thread for every MLX call: loads and forwards never run concurrently
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="mlx")
        self.shard: Shard | None = None  # gRPC pipeline: the weights this process holds
        self.runner: Runner | None = None
        self.ring_port = ring_port  # 0: a free port is picked for each plan
        self._load_lock = asyncio.Lock()
        self._process = psutil.Process()
        self._process.cpu_percent()

    # ------------------------------------------------------------ info

    def _shard_info(self) -> pb.ShardInfo | None:
        return self.runner.shard_info() if self.runner is not None else None

    async def Heartbeat(self, request: pb.HeartbeatRequest, context) -> pb.HeartbeatReply:
        await self.faults.wait_if_hung()
        if self.faults.cut_off((request.sender,), "from"):
            await asyncio.sleep(30)  # partitioned: the caller's deadline passes first
            await context.abort(grpc.StatusCode.UNAVAILABLE, "partitioned")
        # while a plan loads, the node answers for the epoch it is loading
        loading = self._loading_epoch if self._load_lock.locked() else 0
        epoch = max(self.runner.epoch if self.runner else 0, loading)
        down = self.coordinator.down if self.coordinator is not None else ()
        return pb.HeartbeatReply(node_id=self.node_id, epoch=epoch, down=sorted(down))

    async def GetInfo(self, request: pb.InfoRequest, context) -> pb.NodeInfo:
        await self.faults.wait_if_hung()
        caps = await asyncio.get_running_loop().run_in_executor(None, capabilities,
                                                                self.memory_budget)
        import mlx.core as mx

        caps["matmul_gflops"] = self.matmul_gflops
        info = pb.NodeInfo(node_id=self.node_id, name=self.name, version=__version__,
                           protocol_version=self.protocol_version,
                           address=self.address, capabilities=pb.Capabilities(**caps),
                           pid=os.getpid(), uptime_s=time.monotonic() - self.started,
                           active_requests=self.runner.active_requests
                           if self.runner else 0,
                           mlx_active_bytes=self._mlx_active(mx),
                           mlx_peak_bytes=mx.get_peak_memory(),
                           rss_bytes=self._process.memory_info().rss,
                           faults_allowed=self.faults.allowed, advertising=self.advertising,
                           auth_required=self.token is not None, tls=self.tls,
                           faults=self.faults.messages(), recoveries=self.recoveries,
                           ring_port=self.ring_port or free_port(self.address.rsplit(":", 1)[0]
                                                                 or "127.0.0.1"))
        info.accepted_epoch = self.accepted_epoch
        info.api_port = self.api_port
        info.insecure = self.insecure
        if self._load_lock.locked():
            info.loading_epoch, info.loading_model = self._loading_epoch, self._loading_model
        info.data_port = self.data_port
        info.mlx_cache_bytes = mx.get_cache_memory()
        info.draining_epochs.extend(r.epoch for r in self._draining)
        if self._staged is not None:
            info.staged_epoch = self._staged.plan.epoch
        shard = self._shard_info()
        if shard is not None and self.runner is not None:
            info.shard.CopyFrom(shard)
            info.plan.CopyFrom(self.runner.plan)
            info.coordinator = (self.coordinator.leader if self.coordinator is not None
                                else self.runner.plan.shards[0].node_id)
        return info

    async def GetMetrics(self, request: pb.MetricsRequest, context) -> pb.Metrics:
        return self.metrics.message(self.node_id,
                                    self.runner.active_requests if self.runner else 0,
                                    self._process.cpu_percent(),
                                    self._process.memory_info().rss)

    @property
    def loading(self) -> bool:
        return self._load_lock.locked()

    def _state(self) -> str:
        if self._load_lock.locked():
            return "loading"
        if self.runner is not None and self.runner.state == "down":
            return "down"
        if self.runner is not None and self.runner.active_requests:
            return "serving"
        return "idle" if self.runner is None else "ready"

    async def WatchMetrics(self, request: pb.WatchRequest,
                           context) -> AsyncIterator[pb.MetricsSnapshot]:
        import mlx.core as mx

        hz = request.hz if math.isfinite(request.hz) and request.hz > 0 else 4.0
        period = 1.0 / min(hz, 50.0)
        process = psutil.Process()
        process.cpu_percent()
        before = self.metrics.copy_totals()
        last = time.monotonic()
        busy_before = getattr(self.runner, "busy_s", 0.0)
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            deltas = self.metrics.deltas_since(before)
            before = self.metrics.copy_totals()
            snap = pb.MetricsSnapshot(
                node_id=self.node_id, time_unix=time.time(), interval_s=now - last,
                state=self._state(), cpu_percent=process.cpu_percent(),
                rss_bytes=process.memory_info().rss, mlx_active_bytes=self._mlx_active(mx),
                memory_budget=self.memory_budget,
                active_requests=self.runner.active_requests if self.runner else 0,
                counters=dict(self.metrics.counters),
                deltas=histogram_messages(deltas))
            shard = self._shard_info()
            if shard is not None:
                snap.shard.CopyFrom(shard)
            busy = getattr(self.runner, "busy_s", 0.0)
            if now > last and busy >= busy_before:  # (a new plan starts from 0)
                snap.busy_fraction = min(1.0, (busy - busy_before) / (now - last))
            snap.microbatches = getattr(self.runner, "microbatches_busy", 0)
            busy_before = busy
            last = now
            yield snap

    def _mlx_active(self, mx) -> int:
        """MLX memory in use for this node: this process's and its plan's elsewhere (an
        mlx-ring worker's)."""
        return mx.get_active_memory() + (self.runner.held_bytes if self.runner else 0)

    # ------------------------------------------------------------ data plane

    async def Forward(self, request_iterator, context) -> AsyncIterator[pb.ForwardReply]:
        """The data plane by gRPC: frames from an upstream neighbour that does not use
        this node's data port (node/dataplane.py)."""
        broken: list[str] = []
        async for reply in serve_forward(request_iterator, self.frame, self.metrics, broken):
            yield reply
        if broken:
            self.metrics.inc("frames_rejected")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"forward stream rejected: {broken[0]}")

    async def RingWake(self, request: pb.RingWakeRequest, context) -> pb.RingWakeReply:
        runner = self.runner
        try:
            loaded = runner.epoch if runner is not None else 0
            if request.epoch > loaded and self._load_lock.locked():
                raise EpochNotLoaded(f"this node is still loading epoch {request.epoch}")
            if runner is None:
                raise NotLoaded("this node holds no mlx-ring plan")
            if request.epoch != runner.epoch:
                raise StaleEpoch(f"wake for plan epoch {request.epoch}, but this node holds "
                                 f"epoch {runner.epoch}")
            runner.wake()
        except Exception as e:
            await abort(context, e)
        return pb.RingWakeReply()

    async def Generate(self, request: pb.GenerateRequest,
                       context) -> AsyncIterator[pb.GenerateEvent]:
        await self.faults.wait_if_hung()
        try:
            async for event in failover.generate(self, request):
                yield event
        except Exception as e:
            await abort(context, e)

    def note_resumed(self, seconds: float | None = None) -> None:
        """A request resumed after the newest recovery gave its first token: `seconds`
        after its own fail-over, or (a client's continuation, None) after the recovery."""
        if not self.recoveries:
            return
        record = self.recoveries[-1]
        if seconds is None:
            if self.runner is None or record.to_epoch != self.runner.epoch:
                return  # a continuation, but not of this node's recovery
            seconds = time.monotonic() - self._recovered_at
        if not record.first_token_s:
            record.first_token_s = seconds
        record.resumed_requests += 1

    # ------------------------------------------------------------ faults, shutdown

    async def InjectFault(self, request: pb.FaultRequest, context) -> pb.FaultReply:
        spec = request.fault
        try:
            fault = self.faults.inject(spec.kind, spec.ms, spec.jitter_ms, spec.p,
                                       spec.factor or 1.0, spec.duration_s,
                                       spec.seed if spec.HasField("seed") else None,
                                       spec.kbps, tuple(spec.peers), spec.direction, spec.gib)
        except Exception as e:
            await abort(context, e)
        log.warning("fault injected: %s %s", fault.kind, fault.id)
        if fault.kind == "kill":
            asyncio.get_running_loop().call_later(0.05, exit_now)
        return pb.FaultReply(active=self.faults.messages())

    async def HealFaults(self, request: pb.HealRequest, context) -> pb.FaultReply:
        try:
            healed = self.faults.heal(request.id)
        except Exception as e:
            await abort(context, e)
        log.info("healed %d fault(s)", len(healed))
        return pb.FaultReply(active=self.faults.messages())

    async def Shutdown(self, request: pb.ShutdownRequest, context) -> pb.ShutdownReply:
        log.warning("shutdown requested: %s", request.reason or "no reason given")
        asyncio.get_running_loop().call_later(0.05, self.stop.set)
        return pb.ShutdownReply(stopping=True)

    # ------------------------------------------------------------ housekeeping

    async def reap_idle_requests(self, every_s: float = 10.0) -> None:
        """Free KV caches of requests nobody has touched for `idle_request_s`."""
        while True:
            await asyncio.sleep(every_s)
            try:
                if self.runner is not None:
                    freed = self.runner.free_idle(self.idle_request_s)
                    if freed:
                        log.info("freed caches of %d idle request(s)", len(freed))
            except Exception:  # the reaper must outlive any one bad pass
                log.exception("idle request reaper")

    async def close(self) -> None:
        if self.data_server is not None:
            self.data_server.close()
        if self.coordinator is not None:
            await self.coordinator.stop()
        if self._knocker is not None:
            self._knocker.cancel()
        await self._close_draining("the node is shutting down")
        if self.runner is not None:
            await self.runner.close("the node is shutting down")
        await self.peers.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
