"""Membership and recovery: every member of a plan watches the others, and the first live
member in plan order coordinates the re-plan. No node is special: the entry node and
rank 0 can die like any other.

Each member sends every other member a Heartbeat each `interval_s`; one that misses
`misses` checks in a row is declared down (defaults: 0.2 s x 3, so a dead peer is noticed
within ~0.8 s on a LAN). The coordinator is decided deterministically: the first member,
in plan order, that is alive (the entry node while it lives, so that the node holding
layer 0, which serves Generate, owns the plan). A member that would take over because
the ones before it are down does so only once every other live member it hears reports
them down too (a heartbeat reply lists what its node has declared down), so a node cut off
from the entry alone does not start a second plan. The coordinator plans the same model
with the same strategy onto the survivors (a manual plan falls back to `memory`; the
plan order is kept, so the first survivor becomes the entry), pushes the new epoch to
every survivor, itself included, and records who noticed, who coordinated and how long
each phase took. Every node accepts a given epoch once (node/service.py), so two
coordinators can never install different plans under one epoch.

A re-plan also needs a majority of the plan (this node and the members it reaches),
unless every lost member refused the connection (its process is gone): a node
partitioned from all the others waits rather than start a plan of its own.

Requests in flight on a surviving entry fail over to the new epoch in the service's
Generate (node/failover.py); requests whose entry died are resent by their clients as
continuations to the new entry (node/resume.py). Nodes that ask to join (a member that
restarted or was left behind, a new node: node/membership.py) are taken in by the same
fenced re-plan once they have settled, for plans that allow it (`auto_rejoin`), with the
new plan loaded beside the old one where memory allows (node/staging.py).

An mlx-ring plan (node/ring.py) is watched the same way, but MLX's groups cannot lose a
rank: a dead peer (or a rank's worker exiting) takes the group down. The coordinator
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
from node.membership import HOLD_OUT_S, settled
from node.placement import check_versions, place, to_proto
from node.plan import DEFAULT_STRATEGY, NodeSpec, PlanError, backend_label
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
        self._down_since: float | None = None  # this node's ring worker exited
        self._down_reason = ""
        self.down: set[str] = set()  # members this node has declared down
        self._heard: dict[str, set[str]] = {}  # what each live member reports down
        self.leader = plan.shards[0].node_id  # who coordinates, as this node sees it
        self._noticed: dict[str, str] = {}  # member declared down -> who declared it first
        self._refused: dict[str, bool] = {}  # its last heartbeat found its port closed
        self._joins_checked = 0.0

    @property
    def ring(self) -> bool:
        return self.plan.backend == "mlx-ring"

    def group_down(self, reason: str) -> None:
        """This node's ring worker exited. The coordinator's recovery starts once heartbeats
        have had the time to tell which peers, if any, died with it."""
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

    async def _healthy(self, peer: pb.PlanShard) -> bool:
        """A Heartbeat answered by the peer's own event loop (a hung or partitioned peer
        does not answer; gRPC's health service would, from the same process)."""
        stub = pb_grpc.NodeServiceStub(self._channel(peer.address))
        try:
            reply = await stub.Heartbeat(pb.HeartbeatRequest(sender=self.servicer.node_id),
                                         timeout=max(0.1, self.interval_s * 1.5))
        except grpc.aio.AioRpcError as e:
            # nothing listens on its port any more: the process is gone, not slow
            self._refused[peer.node_id] = "refused" in (e.details() or "").lower()
            return False
        self._refused[peer.node_id] = False
        if reply.epoch > self.plan.epoch:
            self._newer = True  # a newer plan exists: this one is no longer ours to watch
        self._heard[peer.node_id] = set(reply.down)
        # a peer that restarted or unloaded answers, but no longer holds its shard
        return reply.epoch >= self.plan.epoch

    def _leader(self) -> str:
        """The first member in plan order this node does not hold down."""
        return next(s.node_id for s in self.plan.shards if s.node_id not in self.down)

    def _quorum(self, dead: list[pb.PlanShard], live: list[str]) -> bool:
        """Whether this node may re-plan without `dead`: it reaches a majority of the plan
        (itself and `live`), or every one of `dead` refused the connection (its process is
        gone: nobody behind a partition is serving it). A node partitioned from the rest
        sees them all time out, and waits instead of starting a second plan."""
        return (len(live) + 1) * 2 > len(self.plan.shards) or all(
            self._refused.get(p.node_id) for p in dead)

    def _confirmed(self, before: set[str], live: list[str]) -> bool:
        """Every live member heard from agrees that `before` are down."""
        return all(before <= self._heard.get(p, set()) for p in live)

    async def _watch(self) -> None:
        me = self.servicer.node_id
        peers = [s for s in self.plan.shards if s.node_id != me]
        missed = {p.node_id: 0 for p in peers}
        last_ok = {p.node_id: time.monotonic() for p in peers}
        self._newer = False
        try:
            while not self._newer:
                await asyncio.sleep(self.interval_s)
                results = await asyncio.gather(*(self._healthy(p) for p in peers))
                now = time.monotonic()
                for peer, ok in zip(peers, results):
                    if ok:
                        missed[peer.node_id], last_ok[peer.node_id] = 0, now
                    else:
                        # a refused connection is as good as two missed heartbeats
                        missed[peer.node_id] += 2 if self._refused.get(peer.node_id) and (
                            missed[peer.node_id]) else 1
                        if missed[peer.node_id] == 1:
                            log.warning("peer %s (%s) missed a heartbeat", peer.name or
                                        peer.node_id, peer.address)
                dead = [p for p in peers if missed[p.node_id] >= self.misses]
                self.down = {p.node_id for p in dead}
                for peer in peers:  # who declared each loss first (a peer, or this node)
                    if peer.node_id not in self.down:
                        for gone in self._heard.get(peer.node_id, ()):
                            self._noticed.setdefault(gone, peer.node_id)
                for gone in self.down:
                    self._noticed.setdefault(gone, me)
                self.leader = self._leader()
                if self.leader != me:
                    continue  # the coordinator acts; its new plan replaces this watch
                live = [p.node_id for p in peers if p.node_id not in self.down]
                before = {s.node_id for s in self.plan.shards[:self._index(me)]}
                if before and not self._confirmed(before, live):
                    continue  # taking over needs the other survivors to agree
                if dead and not self._quorum(dead, live):
                    continue  # a minority cut off from the rest must not start a plan
                # the group went down but every peer answers: re-form on the same nodes
                alone = (not dead and self._down_since is not None and now - self._down_since
                         >= self.interval_s * (self.misses + 1))
                joined = [] if dead or alone else await self._joiners(now)
                if joined:  # nodes that asked to join have settled: take them in
                    self._recovering = True
                    try:
                        replaced = await self._recover([], now, 0.0, joined)
                    finally:
                        self._recovering = False
                    if replaced:
                        return
                    continue  # refused before anything changed: this plan goes on
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
            log.info("a newer plan than epoch %d is in place; this node stops watching it",
                     self.plan.epoch)
            # if this node is not in it (cut off while the others re-planned), it is a ghost
            # holding a dead plan's weights: it drops them and asks to join the new one
            self.servicer.maybe_left_behind(
                self.plan, [s.address for s in self.plan.shards
                            if s.node_id != self.servicer.node_id])
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("coordinator stopped")

    async def _joiners(self, now: float) -> list[pb.PlanShard]:
        """The nodes that asked to join (node/membership.py) and may be taken in now, as
        plan members to add (checked at most once a second)."""
        if not self.plan.auto_rejoin or now - self._joins_checked < 1.0:
            return []
        self._joins_checked = now
        pending = self.servicer.joiners.pending(self.plan)
        if not pending:
            return []

        async def info(joiner) -> pb.NodeInfo | None:
            """Its info, if it answers a heartbeat from here as a member would have to."""
            stub = pb_grpc.NodeServiceStub(self._channel(joiner.address))
            try:
                await stub.Heartbeat(pb.HeartbeatRequest(sender=self.servicer.node_id),
                                     timeout=1.0)
                return await stub.GetInfo(pb.InfoRequest(), timeout=2.0)
            except grpc.aio.AioRpcError:
                joiner.blocked = time.monotonic()  # its settle time starts again
                return None

        infos = await asyncio.gather(*(info(j) for j in pending))
        return [pb.PlanShard(node_id=j.node_id, address=j.address, name=j.name)
                for j, i in zip(pending, infos)
                if settled(j, i, self.plan, self.servicer.protocol_version)]

    def _index(self, node_id: str) -> int:
        return [s.node_id for s in self.plan.shards].index(node_id)

    async def _recover(self, dead: list[pb.PlanShard], t_down: float, detect_s: float,
                       joined: list[pb.PlanShard] = ()) -> bool:
        """A new plan without the `dead` members (a loss) or with the `joined` nodes added
        (a join): same model, strategy and order, a new epoch, loaded everywhere. False
        when a join was refused before anything changed (the plan serves on)."""
        from node.models import resolve

        record = pb.Recovery(from_epoch=self.plan.epoch, lost=[p.node_id for p in dead],
                             detect_s=detect_s, at_unix=time.time(),
                             coordinator=self.servicer.node_id,
                             noticed_by=next((self._noticed[p.node_id] for p in dead
                                              if p.node_id in self._noticed),
                                             self.servicer.node_id),
                             joined=[j.node_id for j in joined])
        record.backend = backend_label(self.plan.backend, self.plan.parallel)
        names = ", ".join(p.name or p.address for p in [*dead, *joined])
        if joined:
            log.warning("taking in %s (asked to join); re-planning", names)
        elif self.ring:
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
                return True
            log.warning("mlx-ring group down (%s); re-forming on the survivors", why)
        else:
            log.warning("declaring %s down; re-planning onto the survivors", names)
        survivors = [s for s in self.plan.shards if s.node_id not in set(record.lost)]
        survivors += joined
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.gather(*(self._info(s) for s in survivors))
            check_versions(infos)  # a survivor restarted on another release cannot join
            source = await loop.run_in_executor(self.servicer.executor, resolve,
                                                self.plan.model, self.options.dtype,
                                                self.options.layers)
            strategy = self.plan.strategy
            if not strategy or strategy.startswith("manual:"):
                strategy = DEFAULT_STRATEGY  # a manual split was for the nodes that are gone
            specs = [NodeSpec(s.node_id, i.capabilities.memory_budget, s.name, s.address,
                              i.capabilities.matmul_gflops)
                     for s, i in zip(survivors, infos)]
            new = place(source, specs, strategy,
                        backend_label(self.plan.backend, self.plan.parallel or "tensor"),
                        self.plan.model, self.plan.context_length or None)
        except (PlanError, Exception) as e:  # noqa: B014 - PlanError named for the reader
            if joined:  # nothing changed: the plan serves on without them, for a while
                log.error("cannot take in %s: %s (asked again in %.0f s)", names, e,
                          HOLD_OUT_S)
                self.servicer.joiners.hold_out(set(record.joined), HOLD_OUT_S)
                return False
            record.error = f"cannot re-plan {self.plan.model} onto the survivors: {e}"
            log.error("%s", record.error)
            self.servicer.recovery_failed(record)
            await self._stop_ring_survivors(record)
            return True
        # newer than any epoch a survivor accepted (a load may have raced this recovery)
        epoch = max([self.plan.epoch, self.servicer.accepted_epoch,
                     *(i.accepted_epoch for i in infos)]) + 1
        proto = to_proto(new, self.plan.model, epoch,
                         backend_label(self.plan.backend, self.plan.parallel or "tensor"),
                         {s.node_id: i.ring_port for s, i in zip(survivors, infos)},
                         self.plan.auto_reform,
                         self.plan.rejoin_settle_s if self.plan.auto_rejoin else None)
        proto.microbatches = self.plan.microbatches
        t_planned = time.monotonic()
        record.to_epoch, record.replan_s = proto.epoch, t_planned - t_down
        others = [s for s in proto.shards if s.node_id != self.servicer.node_id]
        # a join leaves the plan whole: load beside it where memory allows, then switch
        # everyone at once (node/staging.py); a loss has no whole plan left to serve
        stage = bool(joined)
        results = await asyncio.gather(
            self.servicer.load_local(proto, self.options, stage),
            *(self._load_remote(s.address, proto, stage) for s in others),
            return_exceptions=True)
        if stage and not any(isinstance(r, BaseException) for r in results):
            results = await asyncio.gather(*(
                self._activate(s, proto.epoch) if staged else asyncio.sleep(0)
                for s, staged in zip([None, *others], results)), return_exceptions=True)
        record.reload_s = time.monotonic() - t_planned
        failed = [f"{s.name or s.address}: {type(r).__name__}: {r}"
                  for s, r in zip([None, *others], results) if isinstance(r, BaseException)
                  and s is not None]
        if failed and not isinstance(results[0], BaseException) and not self.ring:
            # this node serves the new epoch, and its watchers declare a member that did not
            # load it down like any other: the plan is not lost
            log.warning("epoch %d: %s did not load it; the plan goes on without them",
                        proto.epoch, "; ".join(failed))
            failed = []
        if isinstance(results[0], BaseException):
            failed.insert(0, f"this node: {type(results[0]).__name__}: {results[0]}")
        if failed:
            record.error = "reload failed: " + "; ".join(failed)
            log.error("%s", record.error)
            self.servicer.recovery_failed(record)
            await self._stop_ring_survivors(record)
            return True
        log.warning("%s: epoch %d -> %d %s %s (detect %.2f s, re-plan %.2f s, reload %.2f s)",
                    "joined" if joined else "recovered", record.from_epoch, record.to_epoch,
                    "with" if joined else "without", names, record.detect_s, record.replan_s,
                    record.reload_s)
        self.servicer.joiners.forget(set(record.joined))
        self.servicer.recovered(record)
        return True

    async def _info(self, shard: pb.PlanShard) -> pb.NodeInfo:
        """A survivor's info: its memory budget, the port its next ring worker may listen
        on, the newest epoch it accepted and its protocol version."""
        stub = pb_grpc.NodeServiceStub(self._channel(shard.address))
        return await stub.GetInfo(pb.InfoRequest(), timeout=2.0)

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

    async def _load_remote(self, address: str, plan: pb.Plan, stage: bool = False) -> bool:
        """Load a member's share of `plan`; True when it was staged (then `_activate`)."""
        stub = pb_grpc.NodeServiceStub(self._channel(address))
        reply = await stub.LoadShard(pb.LoadShardRequest(plan=plan, options=self.options,
                                                         stage=stage),
                                     timeout=300.0, metadata=token_metadata(self.servicer.token))
        return reply.staged

    async def _activate(self, shard: pb.PlanShard | None, epoch: int) -> None:
        """Switch a member (None: this node) to the staged plan `epoch`."""
        if shard is None:
            await self.servicer.activate(epoch)
            return
        stub = pb_grpc.NodeServiceStub(self._channel(shard.address))
        await stub.Activate(pb.ActivateRequest(epoch=epoch), timeout=60.0,
                            metadata=token_metadata(self.servicer.token))
