"""The node's gRPC service: control plane (info, load, unload, metrics, faults), the data
plane's entry (`frame`: frames from the data port or a Forward stream, handed to the plan's
runner) and the Generate entry point. node/server.py starts it, with gRPC's standard
health service and the data port (node/datalink.py) beside it.

The service holds at most one plan at a time, run by a `Runner` (node/runner.py): the
gRPC pipeline or an mlx-ring group. What a plan must satisfy is node/placement.py's; how
Forward streams are read, node/dataplane.py's; what Generate retries, node/failover.py's.
Every error a caller can cause is answered with a precise status and a message, and the
node keeps serving: nothing a request sends can take the process down.
"""

from __future__ import annotations

import asyncio
import importlib
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
from node.auth import token_metadata
from node.capabilities import capabilities, default_memory_budget
from node.coordinator import Coordinator
from node.datalink import DataServer
from node.dataplane import serve_forward
from node.engine import Engine, windows
from node.errors import (
    EpochNotLoaded,
    NodeError,
    NotLoaded,
    StaleEpoch,
)
from node.faults import FaultBook, exit_now
from node.frames import Intake
from node.membership import Joiners, check_join, knock, remember_plan, remembered
from node.metrics import NodeMetrics, histogram_messages
from node.models import Shard, load_shard, resolve
from node.peers import PeerChannels
from node.pipeline import Pipeline
from node.placement import check_source, own_shard
from node.plan import GIB
from node.ring import RingGroup, free_port
from node.runner import Runner
from node.staging import Staged, fits_beside, load_beside, same_shard
from node.tokenizers import prompt_tokenizer
from node.warmup import warm
from protos import cluster_pb2 as pb
from protos import cluster_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
LEFT_BEHIND_GRACE_S = 2.0  # a member slower to switch to a new plan is not left behind


async def _abort(context: grpc.aio.ServicerContext, error: Exception) -> None:
    if isinstance(error, NodeError):
        code = grpc.StatusCode.__members__.get(error.code, grpc.StatusCode.INTERNAL)
        await context.abort(code, str(error))
    log.exception("unexpected error")
    await context.abort(grpc.StatusCode.INTERNAL, f"{type(error).__name__}: {error}")


class NodeServicer(pb_grpc.NodeServiceServicer):
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
            last = now
            yield snap

    def _mlx_active(self, mx) -> int:
        """MLX memory in use for this node: this process's and its plan's elsewhere (an
        mlx-ring worker's)."""
        return mx.get_active_memory() + (self.runner.held_bytes if self.runner else 0)

    # ------------------------------------------------------------ load / unload

    async def LoadShard(self, request: pb.LoadShardRequest, context) -> pb.LoadShardReply:
        try:
            async with self._load_lock:
                staged = await self._load(request.plan, request.options, request.stage)
        except Exception as e:
            await _abort(context, e)
        info = staged.runner.shard_info() if staged else self._shard_info()
        assert info is not None
        return pb.LoadShardReply(shard=info, staged=staged is not None)

    async def Activate(self, request: pb.ActivateRequest, context) -> pb.LoadShardReply:
        """Switch to the plan staged beside the serving one (node/staging.py)."""
        try:
            await self.activate(request.epoch)
        except Exception as e:
            await _abort(context, e)
        return pb.LoadShardReply(shard=self._shard_info())

    async def activate(self, epoch: int) -> None:
        async with self._load_lock:
            staged = self._staged
            if staged is None or staged.plan.epoch != epoch:
                if self.runner is not None and self.runner.epoch == epoch:
                    return  # already switched
                raise StaleEpoch(f"plan epoch {epoch} is not staged on this node")
            self._staged = None
            if self.coordinator is not None:
                await self.coordinator.stop()
                self.coordinator = None
            old_runner, self.runner, self.shard = self.runner, staged.runner, staged.shard
            if old_runner is not None:  # new requests go to the new plan from now on
                self._draining.append(old_runner)
                asyncio.get_running_loop().create_task(self._drain(old_runner, epoch))
            del old_runner
            ours = next(s for s in staged.plan.shards if s.node_id == self.node_id)
            await self._installed(staged.plan, staged.options, ours, staged.shard.load_seconds)

    async def _drain(self, old: Runner, epoch: int) -> None:
        """The requests in flight on a plan that was switched away from finish on it (its
        frames still reach it, node/frames.py); then it closes and its weights go back.
        Past `request_timeout_s`, those left go on under the new plan (node/failover.py)."""
        deadline = time.monotonic() + self.request_timeout_s
        while old.active_requests and time.monotonic() < deadline and old in self._draining:
            await asyncio.sleep(0.05)
        if old in self._draining:
            self._draining.remove(old)
            await old.close(f"plan epoch {epoch} replaced epoch {old.epoch}")
        del old
        await asyncio.get_running_loop().run_in_executor(self.executor, _clear_mlx_cache)

    async def _close_draining(self, reason: str) -> None:
        draining, self._draining = self._draining, []
        for old in draining:
            await old.close(reason)

    def runner_for(self, epoch: int) -> Runner | None:
        """The plan a frame of `epoch` belongs to: one still draining, or the current."""
        return next((r for r in self._draining if r.epoch == epoch), self.runner)

    def maybe_left_behind(self, plan: pb.Plan, members: list[str]) -> None:
        """The other members of `plan` moved to a newer one. If this node is still on
        `plan` after a grace period (it was not left out, only slower to switch, when it
        is not), it unloads it and asks the members to take it in (node/membership.py)."""
        asyncio.get_running_loop().create_task(self._left_behind(plan, members))

    async def _left_behind(self, plan: pb.Plan, members: list[str]) -> None:
        await asyncio.sleep(LEFT_BEHIND_GRACE_S)
        async with self._load_lock:
            runner = self.runner
            if runner is None or runner.epoch != plan.epoch or self._staged is not None:
                return
            log.warning("plan epoch %d went on without this node; dropping its shard and "
                        "asking to join the new plan", plan.epoch)
            if self.coordinator is not None:
                await self.coordinator.stop()
                self.coordinator = None
            self.runner, self.shard = None, None
            await runner.close(f"plan epoch {plan.epoch} went on without this node")
            del runner
            await asyncio.get_running_loop().run_in_executor(self.executor, _clear_mlx_cache)
        if plan.auto_rejoin:
            self.start_knocking(members)

    def start_knocking(self, targets: list[str]) -> None:
        """Ask the plan of `targets` (and of the last plan's members) to take this node in,
        until one does (node/membership.py)."""
        request = pb.JoinRequest(node_id=self.node_id, address=self.address, name=self.name)
        if self._knocker is not None:
            self._knocker.cancel()
        self._knocker = asyncio.get_running_loop().create_task(knock(
            request, [*targets, *remembered(self.state_dir)], self.peers.get,
            token_metadata(self.token), lambda: self.runner is not None, self.stop))

    async def _stage(self, plan: pb.Plan, options: pb.ModelOptions, ours: pb.PlanShard,
                     source) -> Staged:
        """Load `plan` beside the serving one, which goes on serving (node/staging.py)."""
        self.accepted_epoch = plan.epoch
        self._staged = None  # a newer plan replaces one staged before it
        if same_shard(self.shard, source, ours):
            shard = self.shard  # the weights it holds serve both
        else:
            shard = await load_beside(self.executor, source, ours.start_layer, ours.end_layer)
        assert shard is not None
        gather_s, admit_s = windows(ours.start_layer == 0, len(plan.shards) == 1)
        engine = Engine(shard, self.executor, on_forward=self._count_forward,
                        gather_s=gather_s, admit_s=admit_s,
                        prompt_cache_bytes=self.prompt_cache_bytes)
        self._staged = Staged(plan, options, shard, Pipeline(
            self.node_id, plan, engine, self.metrics, self.peers, self.request_timeout_s,
            token_metadata(self.token), self.faults))
        log.info("staged %s layers %d-%d (epoch %d) beside epoch %d in %.1f s", plan.model,
                 ours.start_layer, ours.end_layer, plan.epoch, self.runner.epoch,
                 shard.load_seconds)
        return self._staged

    async def _load(self, plan: pb.Plan, options: pb.ModelOptions,
                    stage: bool = False) -> Staged | None:
        """Load `plan`. With `stage`, where the memory budget holds both, beside the plan
        that serves (returned, for Activate); otherwise in its place (None)."""
        # everything that can refuse the plan runs before the loaded one is touched
        ours = own_shard(plan, self.node_id, self.runner.epoch if self.runner else 0,
                         self.accepted_epoch)
        ring = plan.backend == "mlx-ring"
        loop = asyncio.get_running_loop()
        source = await loop.run_in_executor(self.executor, resolve, plan.model, options.dtype,
                                            options.layers)
        # off the event loop: sizing a shard builds the model's shapes with mlx-lm, whose
        # first import (transformers with it) takes seconds in a fresh process, long enough
        # for its peers to miss its heartbeats
        await loop.run_in_executor(self.executor, check_source, plan, ours, source,
                                   self.memory_budget)
        serving = self.runner is not None and self.runner.plan.backend in ("", "pipeline")
        if stage and not ring and serving and (
                same_shard(self.shard, source, ours)
                or fits_beside(self.shard, ours, self.memory_budget)):
            return await self._stage(plan, options, ours, source)
        self._staged = None
        await self._close_draining(f"plan epoch {plan.epoch} replaced them")
        self._loading_epoch = self.accepted_epoch = plan.epoch
        self._loading_model = plan.model
        if self.coordinator is not None and not self.coordinator.recovering:
            # this plan replaces the one it watches; peers are reloading too
            await self.coordinator.stop()
            self.coordinator = None
        old = self.shard
        same = not ring and old is not None and old.source == source and (
            old.start, old.end) == (ours.start_layer, ours.end_layer)
        del old  # (it would keep the old weights alive through the new load)
        if self.runner is not None:
            old_runner, self.runner = self.runner, None  # no new frames reach it
            await old_runner.close(
                f"plan epoch {plan.epoch} replaced epoch {old_runner.epoch}")
            del old_runner  # it holds the old shard: its weights go before the new load
        if not same:
            self.shard = None  # drop the old weights before loading new ones
            await loop.run_in_executor(self.executor, _clear_mlx_cache)
        if ring:
            tokenizer = None
            if plan.shards[0].node_id == self.node_id:  # rank 0 tokenises for the group
                tokenizer = await loop.run_in_executor(self.executor, prompt_tokenizer, source)
            group = RingGroup(self.node_id, plan, options, source, tokenizer, self.metrics,
                              self.request_timeout_s, on_down=self._ring_down,
                              metadata=token_metadata(self.token), peers=self.peers)
            await group.start()
            self.runner, load_seconds = group, group.load_seconds
        else:
            if not same:
                self.shard = await loop.run_in_executor(self.executor, load_shard, source,
                                                        ours.start_layer, ours.end_layer)
            assert self.shard is not None
            gather_s, admit_s = windows(ours.start_layer == 0, len(plan.shards) == 1)
            engine = Engine(self.shard, self.executor, on_forward=self._count_forward,
                            gather_s=gather_s, admit_s=admit_s,
                            prompt_cache_bytes=self.prompt_cache_bytes)
            if not same:
                await self._warm(engine)
            self.runner = Pipeline(self.node_id, plan, engine, self.metrics, self.peers,
                                   self.request_timeout_s, token_metadata(self.token),
                                   self.faults)
            load_seconds = self.shard.load_seconds
        await self._installed(plan, options, ours, load_seconds)
        return None

    async def _installed(self, plan: pb.Plan, options: pb.ModelOptions, ours: pb.PlanShard,
                         load_seconds: float) -> None:
        """A plan now serves here: its watch, its memory, and whoever waits for it."""
        if self.coordinator is not None:
            await self.coordinator.stop()
            self.coordinator = None
        # every member watches; the first live one coordinates (and takes joiners in)
        if len(plan.shards) > 1 or plan.auto_rejoin:
            self.coordinator = Coordinator(self, plan, options)
            self.coordinator.start()
        remember_plan(self.state_dir, plan, self.node_id)
        self.recovery_error = ""
        async with self._epoch_changed:
            self._epoch_changed.notify_all()
        log.info("loaded %s layers %d-%d (epoch %d, %s) in %.1f s", plan.model,
                 ours.start_layer, ours.end_layer, plan.epoch, plan.backend or "pipeline",
                 load_seconds)

    def preload(self) -> None:
        """Import mlx-lm (and transformers with it) on the MLX thread now, while the node
        is new, rather than at its first load."""
        asyncio.get_running_loop().run_in_executor(self.executor, importlib.import_module,
                                                   "mlx_lm")

    async def _warm(self, engine: Engine) -> None:
        """Run the batch sizes the node serves once, before the plan is live
        (node/warmup.py); a failure only means a slower first request."""
        try:
            sizes, seconds = await asyncio.get_running_loop().run_in_executor(
                self.executor, warm, engine.batch, self.warmup_batches)
        except Exception as e:
            log.warning("warm-up failed (%s: %s); serving without it", type(e).__name__, e)
            return
        if sizes:
            engine.shard.load_seconds += seconds
            log.info("warmed batch sizes %s in %.2f s", ",".join(map(str, sizes)), seconds)

    def _count_forward(self, rows: int) -> None:
        """Each forward the engine ran and how many requests it served (the batch size)."""
        self.metrics.inc("forward_steps")
        self.metrics.inc("forward_rows", rows)

    def _ring_down(self, group: RingGroup) -> None:
        """This node's ring worker exited: tell the coordinator (rank 0) to act on it."""
        if self.coordinator is not None and group is self.runner:
            self.coordinator.group_down(group.error)

    async def load_local(self, plan: pb.Plan, options: pb.ModelOptions,
                         stage: bool = False) -> bool:
        """Load a plan on this node (the coordinator's own share of a re-plan); True when
        it was staged beside the serving plan (then `activate`)."""
        async with self._load_lock:
            return await self._load(plan, options, stage) is not None

    def recovered(self, record: pb.Recovery) -> None:
        self.recoveries.append(record)
        self._recovered_at = time.monotonic()
        self.metrics.inc("recoveries")

    def recovery_failed(self, record: pb.Recovery) -> None:
        self.recoveries.append(record)
        self.recovery_error = record.error
        self.metrics.inc("recoveries_failed")
        asyncio.get_running_loop().create_task(self._notify_epoch())

    async def _notify_epoch(self) -> None:
        async with self._epoch_changed:
            self._epoch_changed.notify_all()

    async def wait_for_epoch_after(self, epoch: int, timeout_s: float) -> bool:
        """True once a plan newer than `epoch` is loaded here; False on failure/timeout."""
        def ready() -> bool:
            return bool(self.recovery_error) or (
                self.runner is not None and self.runner.epoch > epoch)

        try:
            async with self._epoch_changed:
                await asyncio.wait_for(self._epoch_changed.wait_for(ready), timeout_s)
        except TimeoutError:
            return False
        return not self.recovery_error

    async def UnloadShard(self, request: pb.UnloadShardRequest, context) -> pb.UnloadShardReply:
        async with self._load_lock:
            self._staged = None
            await self._close_draining("the shard was unloaded")
            if self.runner is None:
                return pb.UnloadShardReply(unloaded=False)
            if request.epoch and request.epoch != self.runner.epoch:
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                    f"epoch {request.epoch} is not loaded (loaded: "
                                    f"{self.runner.epoch})")
            if self.coordinator is not None:  # nothing left to watch over
                await self.coordinator.stop()
                self.coordinator = None
            old_runner, self.runner = self.runner, None
            self.shard = None
            await old_runner.close("the shard was unloaded")
            del old_runner  # its shard's weights go back before the cache is cleared
            await asyncio.get_running_loop().run_in_executor(self.executor, _clear_mlx_cache)
        return pb.UnloadShardReply(unloaded=True)

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
            await _abort(context, e)
        return pb.RingWakeReply()

    async def Generate(self, request: pb.GenerateRequest,
                       context) -> AsyncIterator[pb.GenerateEvent]:
        await self.faults.wait_if_hung()
        try:
            async for event in failover.generate(self, request):
                yield event
        except Exception as e:
            await _abort(context, e)

    async def Join(self, request: pb.JoinRequest, context) -> pb.JoinReply:
        """A node asks to be taken into this node's plan (node/membership.py)."""
        if why := check_join(request):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, why)
        runner = self.runner
        if runner is None:
            return pb.JoinReply(detail="this node holds no plan")
        plan = runner.plan
        if not plan.auto_rejoin:
            return pb.JoinReply(epoch=plan.epoch, detail=(
                f"plan epoch {plan.epoch} takes no joiners (a manual split, an mlx-ring "
                "group or --no-auto-rejoin): run mlx-cluster rebalance"))
        self.joiners.knock(request)
        leader = self.coordinator.leader if self.coordinator else plan.shards[0].node_id
        address = next((s.address for s in plan.shards if s.node_id == leader), "")
        return pb.JoinReply(accepted=True, coordinator=leader, coordinator_address=address,
                            epoch=plan.epoch)

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
            await _abort(context, e)
        log.warning("fault injected: %s %s", fault.kind, fault.id)
        if fault.kind == "kill":
            asyncio.get_running_loop().call_later(0.05, exit_now)
        return pb.FaultReply(active=self.faults.messages())

    async def HealFaults(self, request: pb.HealRequest, context) -> pb.FaultReply:
        try:
            healed = self.faults.heal(request.id)
        except Exception as e:
            await _abort(context, e)
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


def _clear_mlx_cache() -> None:
    import gc

    import mlx.core as mx

    gc.collect()
    mx.clear_cache()
