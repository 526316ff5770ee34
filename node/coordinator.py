"""Membership and recovery: the node holding layer 0 watches its peers and re-plans.

The first shard of a plan owns it. It sends every peer a Heartbeat each `interval_s`; a
peer that misses `misses` checks in a row is declared down (defaults: 0.2 s x 3, so a
dead peer is noticed within ~0.8 s on a LAN). It then plans the same model with the same
strategy onto the survivors (a manual plan falls back to `memory`), pushes the new epoch
to every survivor (itself included) and records how long each phase took. Requests in
flight fail over to the new epoch in the service's Generate (replaying their tokens, so
the client's stream continues with no gap and no duplicate). A node that comes back is
not re-admitted automatically: the operator loads again (`mlx-cluster load`).

An mlx-ring plan (node/ring.py) is watched the same way, but MLX's groups cannot lose a
rank: a dead peer (or rank 0's own worker exiting) takes the group down. The coordinator
reports it at once and, when the plan asks for `auto_reform`, forms a new group on the
survivors (same backend and parallelism, if the model still fits and splits); otherwise
the operator loads again.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from node.auth import token_metadata
from node.placement import place, to_proto
from node.plan import NodeSpec, PlanError, backend_label
from protos import cluster_pb2 as pb
from protos import cluster_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


class Coordinator:
    def __init__(self, servicer, plan: pb.Plan, options: pb.ModelOptions,
                 interval_s: float = 0.2, misses: int = 3) -> None:
        self.servicer = servicer
        self.plan = plan
        self.options = options
        self.interval_s = interval_s
        self.misses = misses
        self._task: asyncio.Task | None = None
        self._channels = servicer.peers  # the node's one channel per peer (node/peers.py)
        self._recovering = False
        self._down_since: float | None = None  # rank 0's ring worker exited
        self._down_reason = ""

    @property
    def ring(self) -> bool:
        return self.plan.backend == "mlx-ring"

    def group_down(self, reason: str) -> None:
        """Rank 0's ring worker exited. Recovery starts once heartbeats have had the time to
        tell which peers, if any, died with it."""
        if self._down_since is None:
            self._down_since, self._down_reason = time.monotonic(), reason

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._watch())

    async def stop(self) -> None:
        """Stop watching. A recovery in progress finishes (it is what replaced the plan)."""
        if self._recovering:
            return
        if self._task is not None:
            self._task.cancel()

    def _channel(self, address: str) -> grpc.aio.Channel:
        return self._channels.get(address)

    @property
    def recovering(self) -> bool:
        return self._recovering

    async def _healthy(self, address: str) -> bool:
        """A Heartbeat answered by the peer's own event loop (a hung or partitioned peer
        does not answer; gRPC's health service would, from the same process)."""
        stub = pb_grpc.NodeServiceStub(self._channel(address))
        try:
            reply = await stub.Heartbeat(pb.HeartbeatRequest(sender=self.servicer.node_id),
                                         timeout=max(0.1, self.interval_s * 1.5))
        except grpc.aio.AioRpcError:
            return False
        # a peer that restarted or unloaded answers, but no longer holds its shard
        return reply.epoch >= self.plan.epoch

    async def _watch(self) -> None:
        peers = [s for s in self.plan.shards if s.node_id != self.servicer.node_id]
        missed = {p.node_id: 0 for p in peers}
        last_ok = {p.node_id: time.monotonic() for p in peers}
        try:
            while True:
                await asyncio.sleep(self.interval_s)
                results = await asyncio.gather(*(self._healthy(p.address) for p in peers))
                now = time.monotonic()
                for peer, ok in zip(peers, results):
                    if ok:
                        missed[peer.node_id], last_ok[peer.node_id] = 0, now
                    else:
                        missed[peer.node_id] += 1
                        if missed[peer.node_id] == 1:
                            log.warning("peer %s (%s) missed a heartbeat", peer.name or
                                        peer.node_id, peer.address)
                dead = [p for p in peers if missed[p.node_id] >= self.misses]
                # the group went down but every peer answers: re-form on the same nodes
                alone = (not dead and self._down_since is not None and now - self._down_since
                         >= self.interval_s * (self.misses + 1))
                if dead or alone:
                    detect_s = (max(now - last_ok[p.node_id] for p in dead) if dead
                                else now - (self._down_since or now))
                    self._recovering = True
                    try:
                        await self._recover(dead, now, detect_s)
                    finally:
                        self._recovering = False
                        for peer in dead:  # nothing should keep reconnecting to them
                            self._channels.forget(peer.address)
                    return  # the new plan's coordinator takes over
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("coordinator stopped")

    async def _recover(self, dead: list[pb.PlanShard], t_down: float, detect_s: float) -> None:
        from node.models import resolve

        record = pb.Recovery(from_epoch=self.plan.epoch, lost=[p.node_id for p in dead],
                             detect_s=detect_s, at_unix=time.time())
        record.backend = backend_label(self.plan.backend, self.plan.parallel)
        names = ", ".join(p.name or p.address for p in dead)
        if self.ring:
            why = f"rank(s) {names} lost" if dead else (
                f"rank 0's worker stopped: {self._down_reason}")
            if self.servicer.runner is not None:
                self.servicer.runner.mark_down(f"the mlx-ring group is down: {why}")
            if not self.plan.auto_reform:
                record.error = (f"the mlx-ring group is down ({why}); MLX groups cannot lose "
                                "a rank: run mlx-cluster load again, or load with "
                                "--auto-reform to re-form on the survivors")
                log.error("%s", record.error)
                self.servicer.recovery_failed(record)
                await self._stop_ring_survivors(record)
                return
            log.warning("mlx-ring group down (%s); re-forming on the survivors", why)
        else:
            log.warning("declaring %s down; re-planning onto the survivors", names)
        survivors = [s for s in self.plan.shards if s.node_id not in set(record.lost)]
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.gather(*(self._budget_and_port(s) for s in survivors))
            source = await loop.run_in_executor(self.servicer.executor, resolve,
                                                self.plan.model, self.options.dtype,
                                                self.options.layers)
            strategy = self.plan.strategy
            if not strategy or strategy.startswith("manual:"):
                strategy = "memory"  # a manual split was for the nodes that are gone
            specs = [NodeSpec(s.node_id, b, s.name, s.address)
                     for s, (b, _) in zip(survivors, infos)]
            new = place(source, specs, strategy,
                        backend_label(self.plan.backend, self.plan.parallel or "tensor"),
                        self.plan.model, self.plan.context_length or None)
        except (PlanError, Exception) as e:  # noqa: B014 - PlanError named for the reader
            record.error = f"cannot re-plan {self.plan.model} onto the survivors: {e}"
            log.error("%s", record.error)
            self.servicer.recovery_failed(record)
            await self._stop_ring_survivors(record)
            return
        proto = to_proto(new, self.plan.model, self.plan.epoch + 1,
                         backend_label(self.plan.backend, self.plan.parallel or "tensor"),
                         {s.node_id: port for s, (_, port) in zip(survivors, infos)},
                         self.plan.auto_reform)
        t_planned = time.monotonic()
        record.to_epoch, record.replan_s = proto.epoch, t_planned - t_down
        others = [s for s in proto.shards if s.node_id != self.servicer.node_id]
        results = await asyncio.gather(
            self.servicer.load_local(proto, self.options),
            *(self._load_remote(s.address, proto) for s in others), return_exceptions=True)
        failed = [str(r) for r in results if isinstance(r, BaseException)]
        record.reload_s = time.monotonic() - t_planned
        if failed:
            record.error = "reload failed: " + "; ".join(failed)
            log.error("%s", record.error)
            self.servicer.recovery_failed(record)
            await self._stop_ring_survivors(record)
            return
        log.warning("recovered: epoch %d -> %d without %s (detect %.2f s, re-plan %.2f s, "
                    "reload %.2f s)", record.from_epoch, record.to_epoch, names,
                    record.detect_s, record.replan_s, record.reload_s)
        self.servicer.recovered(record)

    async def _budget_and_port(self, shard: pb.PlanShard) -> tuple[int, int]:
        """A survivor's memory budget and the port its next ring worker may listen on."""
        stub = pb_grpc.NodeServiceStub(self._channel(shard.address))
        info = await stub.GetInfo(pb.InfoRequest(), timeout=2.0)
        return info.capabilities.memory_budget, info.ring_port

    async def _stop_ring_survivors(self, record: pb.Recovery) -> None:
        """No new group: the surviving ranks' workers would wait, holding their weights,
        for a group that is gone. Unload them (MLX's groups do not come back)."""
        if not self.ring:
            return
        others = [s for s in self.plan.shards if s.node_id not in set(record.lost)
                  and s.node_id != self.servicer.node_id]
        await asyncio.gather(*(self._unload_remote(s.address) for s in others),
                             return_exceptions=True)

    async def _unload_remote(self, address: str) -> None:
        stub = pb_grpc.NodeServiceStub(self._channel(address))
        await stub.UnloadShard(pb.UnloadShardRequest(epoch=self.plan.epoch), timeout=10.0,
                               metadata=token_metadata(self.servicer.token))

    async def _load_remote(self, address: str, plan: pb.Plan) -> None:
        stub = pb_grpc.NodeServiceStub(self._channel(address))
        await stub.LoadShard(pb.LoadShardRequest(plan=plan, options=self.options),
                             timeout=300.0, metadata=token_metadata(self.servicer.token))
