"""Joining a plan: a node that restarted (same node id, perhaps on another port or
address) or a new one asks to be taken in, and the plan's coordinator takes it in with a
re-plan once it has stayed up for the plan's settle time.

The node id is a node's identity, not its address. A node remembers the members of the
last plan it held (in its state dir); when it starts holding none, it knocks (the Join
RPC) on them, on the nodes named by `mlx-node serve --join` or `--peers-file`, on the
nodes that announce its cluster on zeroconf (node/advertise.py: same token, same
cluster), and on whatever coordinator they point it to, once a second until a plan takes
it in. Every
member notes the knock (`Joiners`), so a coordinator that takes over after a loss knows of
it too; only the coordinator acts (node/coordinator.py), through the same fenced re-plan
as a loss, and only for plans loaded with `auto_rejoin`.

A node that flaps (up, down, up) is held out until it has stayed up `rejoin_settle_s`
(its own uptime, from GetInfo), so the plan does not thrash: a loss and a join, at most,
however often it flaps meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

from protos import cluster_pb2 as pb
from protos import cluster_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

REJOIN_SETTLE_S = 10.0  # how long a joiner must have been up before a re-plan takes it in
KNOCK_S = 1.0  # a joiner knocks this often
FRESH_S = 5.0  # a knock older than this is from a node that stopped knocking
HOLD_OUT_S = 60.0  # a joiner the plan could not take is asked again after this
PLAN_FILE = "last_plan.json"


@dataclass
class Joiner:
    node_id: str
    address: str
    name: str
    knocked: float  # monotonic time of its latest knock
    blocked: float = 0.0  # monotonic time the coordinator last failed to reach it


class Joiners:
    """The nodes that asked to join, by node id (the latest address wins)."""

    def __init__(self) -> None:
        self._by_id: dict[str, Joiner] = {}
        self._held: dict[str, float] = {}  # node id -> monotonic time it may be tried again

    def knock(self, request: pb.JoinRequest) -> None:
        known = self._by_id.get(request.node_id)
        if known is None:
            self._by_id[request.node_id] = Joiner(request.node_id, request.address,
                                                  request.name, time.monotonic())
        else:  # in place: a check of it may be under way
            known.address, known.name = request.address, request.name
            known.knocked = time.monotonic()

    def pending(self, plan: pb.Plan) -> list[Joiner]:
        """Those still knocking that are not members of `plan`."""
        members = {s.node_id for s in plan.shards}
        now = time.monotonic()
        return [j for j in self._by_id.values() if j.node_id not in members
                and now - j.knocked < FRESH_S and self._held.get(j.node_id, 0.0) <= now]

    def forget(self, node_ids: set[str]) -> None:
        for node_id in node_ids:
            self._by_id.pop(node_id, None)

    def hold_out(self, node_ids: set[str], seconds: float) -> None:
        """Leave these out of `pending` for a while (a plan that could not take them)."""
        for node_id in node_ids:
            self._held[node_id] = time.monotonic() + seconds


def settled(joiner: Joiner, info: pb.NodeInfo | None, plan: pb.Plan, protocol: int,
            now: float | None = None) -> bool:
    """Whether a re-plan may take `joiner` in now: it answers as the node that knocked,
    speaks the plan's protocol, has stayed up and reachable for the plan's settle time
    (since its process started and since the coordinator last failed to reach it: a node
    behind a partition knocks too), and holds no newer plan than this one (a node serving
    another cluster is not taken)."""
    if info is None or info.node_id != joiner.node_id or info.protocol_version != protocol:
        return False
    now = time.monotonic() if now is None else now
    stayed = min(info.uptime_s, now - joiner.blocked)
    if info.loading_epoch or stayed < plan.rejoin_settle_s:
        return False
    return not info.HasField("shard") or info.shard.epoch < plan.epoch


def check_join(request: pb.JoinRequest) -> str:
    """Why a Join request is malformed ("" when it is not)."""
    if not request.node_id or len(request.node_id) > 64:
        return "a Join needs the node id (at most 64 characters)"
    host, _, port = request.address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        return f"a Join needs the node's address as host:port, not {request.address!r}"
    return ""


# ---------------------------------------------------------------- the joiner's side


def remember_plan(state_dir: Path | None, plan: pb.Plan, own_id: str) -> None:
    """Keep the addresses of the plan's other members, to knock on after a restart."""
    if state_dir is None:
        return
    members = [s.address for s in plan.shards if s.node_id != own_id]
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        tmp = state_dir / (PLAN_FILE + ".tmp")
        tmp.write_text(json.dumps({"model": plan.model, "epoch": plan.epoch,
                                   "members": members}))
        os.replace(tmp, state_dir / PLAN_FILE)
    except OSError as e:  # a read-only state dir costs the automatic rejoin, nothing else
        log.warning("cannot remember the plan's members in %s (%s)", state_dir, e)


def remembered(state_dir: Path | None) -> list[str]:
    """The other members of the last plan this node held (none if it held none)."""
    if state_dir is None:
        return []
    try:
        members = json.loads((state_dir / PLAN_FILE).read_text()).get("members", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [m for m in members if isinstance(m, str)]


async def knock(request: pb.JoinRequest, targets: list[str],
                channel: Callable[[str], grpc.aio.Channel], metadata: tuple,
                holds_plan: Callable[[], bool], stop: asyncio.Event) -> None:
    """Knock on `targets` (and on the coordinators they name) every KNOCK_S until this node
    holds a plan or stops. `targets` may grow meanwhile (nodes found by zeroconf). What
    stands in the way is logged once per kind."""
    said: set[str] = set()

    def say(key: str, message: str, *args) -> None:
        if key not in said:
            said.add(key)
            log.warning(message, *args)

    if targets:
        log.info("asking to join the plan of %s", ", ".join(targets))
    while targets and not holds_plan() and not stop.is_set():
        for target in list(dict.fromkeys(t for t in targets if t != request.address)):
            stub = pb_grpc.NodeServiceStub(channel(target))
            try:
                reply = await stub.Join(request, timeout=KNOCK_S, metadata=metadata)
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.UNAUTHENTICATED:
                    say("token", "%s refused to take this node in: %s (give every node the "
                        "same cluster token)", target, e.details())
                continue
            if reply.accepted:
                say(f"ok {reply.epoch}", "%s: plan epoch %d takes joiners; coordinator %s",
                    target, reply.epoch, reply.coordinator_address)
                if reply.coordinator_address and reply.coordinator_address not in targets:
                    targets.append(reply.coordinator_address)
            elif reply.epoch:
                say(f"no {reply.epoch}", "%s: %s", target, reply.detail)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), KNOCK_S)
