"""Holding a plan: what a node does to load one (in place, or staged beside the plan that
serves and then activated, node/staging.py), to unload it, to let a replaced plan finish
its requests, and to be taken into a plan (node/membership.py). A mixin of the node's
gRPC service (node/service.py), which owns the state it works on: `runner`, `shard`, the
load lock, the coordinator, the executor (the MLX thread) and the node's settings.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import time

import grpc

from node.auth import token_metadata
from node.coordinator import Coordinator
from node.engine import Engine, windows
from node.errors import NodeError, StaleEpoch
from node.membership import check_join, knock, remember_plan, remembered
from node.memory import release as release_memory
from node.models import load_shard, resolve
from node.pipeline import Pipeline
from node.placement import check_source, own_shard
from node.ring import RingGroup
from node.runner import Runner
from node.staging import Staged, fits_beside, load_beside, same_shard
from node.tokenizers import prompt_tokenizer
from node.warmup import warm
from protos import cluster_pb2 as pb

log = logging.getLogger(__name__)
LEFT_BEHIND_GRACE_S = 2.0  # a member slower to switch to a new plan is not left behind


async def abort(context: grpc.aio.ServicerContext, error: Exception) -> None:
    """End an RPC with the status a NodeError names (INTERNAL, logged, for anything else)."""
    if isinstance(error, NodeError):
        code = grpc.StatusCode.__members__.get(error.code, grpc.StatusCode.INTERNAL)
        await context.abort(code, str(error))
    log.exception("unexpected error")
    await context.abort(grpc.StatusCode.INTERNAL, f"{type(error).__name__}: {error}")


class PlanHolder:
    """Loading, switching and leaving plans (see the module docstring)."""

    async def LoadShard(self, request: pb.LoadShardRequest, context) -> pb.LoadShardReply:
        try:
            async with self._load_lock:
                staged = await self._load(request.plan, request.options, request.stage)
        except Exception as e:
            await abort(context, e)
        info = staged.runner.shard_info() if staged else self._shard_info()
        assert info is not None
        return pb.LoadShardReply(shard=info, staged=staged is not None)

    async def Activate(self, request: pb.ActivateRequest, context) -> pb.LoadShardReply:
        """Switch to the plan staged beside the serving one (node/staging.py)."""
        try:
            await self.activate(request.epoch)
        except Exception as e:
            await abort(context, e)
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
        await asyncio.get_running_loop().run_in_executor(self.executor, release_memory)

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
            await asyncio.get_running_loop().run_in_executor(self.executor, release_memory)
        if plan.auto_rejoin:
            self.start_knocking(members)

    def knock_on(self, address: str) -> None:
        """A node of this node's cluster was found (zeroconf): ask it too, while this node
        holds no plan."""
        if address not in self._knock_targets:
            self._knock_targets.append(address)
        if self.runner is None and (self._knocker is None or self._knocker.done()):
            self.start_knocking([])

    def start_knocking(self, targets: list[str]) -> None:
        """Ask the plan of `targets` (and of the last plan's members) to take this node in,
        until one does (node/membership.py)."""
        request = pb.JoinRequest(node_id=self.node_id, address=self.address, name=self.name)
        self._knock_targets[:] = dict.fromkeys([*self._knock_targets, *targets,
                                                *remembered(self.state_dir)])
        targets = self._knock_targets  # shared: zeroconf may add to it (knock_on)
        if targets:  # its first load will import mlx-lm (seconds): do it while it settles
            asyncio.get_running_loop().run_in_executor(self.executor, importlib.import_module,
                                                       "mlx_lm")
        if self._knocker is not None:
            self._knocker.cancel()
        self._knocker = asyncio.get_running_loop().create_task(knock(
            request, targets, self.peers.get,
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
            await loop.run_in_executor(self.executor, release_memory)
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

    def _count_forward(self, rows: int, group: int = 0, seconds: float = 0.0) -> None:
        """Each forward the engine ran, how many requests it served (the batch size), its
        time (the bench's measured stage time) and the forwards of each micro-batch."""
        self.metrics.inc("forward_steps")
        self.metrics.inc("forward_us", int(seconds * 1e6))
        self.metrics.inc("forward_rows", rows)
        self.metrics.inc(f"forward_steps:group{group}")

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
            await asyncio.get_running_loop().run_in_executor(self.executor, release_memory)
        return pb.UnloadShardReply(unloaded=True)

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
