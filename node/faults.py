"""Failure injection on a node, in toxiproxy / Chaos Mesh vocabulary.

Only on nodes started with --allow-faults (and, where a token is set, only with it: the
RPCs are mutating). Each fault has an optional duration after which it heals itself and
a seed for its random parts. Effects:
- kill: the process exits right after answering.
- hang: the node stops answering Forward and Generate (it stays alive; health answers).
- latency --ms M --jitter J: every Forward frame is delayed M +- J ms before it is used.
- loss --p P: each Forward frame is dropped with probability P.
- slow-compute --factor F: each shard step takes F times as long.
- bandwidth --kbps K: incoming Forward frames are paced to K kbit/s.
- partition --peers A,B [--direction to|from|both]: frames and heartbeats from those
  peers are dropped ("from"), frames to them are dropped ("to"), or both.
- memory-pressure --gib G: the node holds G GiB of memory until healed.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import random
import time
import uuid
from dataclasses import dataclass

from node.errors import NodeError
from node.plan import GIB
from protos import cluster_pb2 as pb

KINDS = ("kill", "hang", "latency", "loss", "slow-compute", "bandwidth", "partition",
         "memory-pressure")
DIRECTIONS = ("both", "to", "from")


class FaultsNotAllowed(NodeError):
    code = "PERMISSION_DENIED"


class BadFault(NodeError):
    code = "INVALID_ARGUMENT"


@dataclass
class Fault:
    id: str
    kind: str
    ms: float = 0.0
    jitter_ms: float = 0.0
    p: float = 0.0
    factor: float = 1.0
    duration_s: float = 0.0
    seed: int | None = None
    started: float = 0.0
    kbps: float = 0.0
    peers: tuple[str, ...] = ()
    direction: str = "both"
    gib: float = 0.0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.ballast: bytearray | None = None

    def cuts(self, peer: str, direction: str) -> bool:
        return self.kind == "partition" and peer in self.peers and self.direction in (
            "both", direction)

    def remaining(self, now: float) -> float:
        return max(0.0, self.started + self.duration_s - now) if self.duration_s else 0.0

    def expired(self, now: float) -> bool:
        return bool(self.duration_s) and now >= self.started + self.duration_s


def validate(kind: str, ms: float, jitter_ms: float, p: float, factor: float,
             duration_s: float, kbps: float = 0.0, peers: tuple[str, ...] = (),
             direction: str = "both", gib: float = 0.0) -> None:
    if kind not in KINDS:
        raise BadFault(f"unknown fault {kind!r}; this node supports {', '.join(KINDS)}")
    values = {"ms": ms, "jitter": jitter_ms, "p": p, "factor": factor, "duration": duration_s,
              "kbps": kbps, "gib": gib}
    bad = [k for k, v in values.items() if not math.isfinite(v)]
    if bad:
        raise BadFault(f"{', '.join(bad)} must be finite numbers")
    if ms > 60_000 or jitter_ms > 60_000 or factor > 100 or duration_s > 86_400:
        raise BadFault("keep --ms/--jitter <= 60000, --factor <= 100, --duration <= 86400")
    if kind == "bandwidth" and kbps < 1:
        raise BadFault("bandwidth needs --kbps >= 1")
    if duration_s < 0 or ms < 0 or jitter_ms < 0:
        raise BadFault("durations and delays must be >= 0")
    if kind == "latency" and ms <= 0:
        raise BadFault("latency needs --ms > 0")
    if kind == "loss" and not 0 < p <= 1:
        raise BadFault("loss needs 0 < --p <= 1")
    if kind == "slow-compute" and factor <= 1:
        raise BadFault("slow-compute needs --factor > 1")
    if kind == "bandwidth" and kbps <= 0:
        raise BadFault("bandwidth needs --kbps > 0")
    if kind == "partition" and (not peers or direction not in DIRECTIONS):
        raise BadFault("partition needs --peers A,B and --direction to|from|both")
    if kind == "memory-pressure":
        import psutil

        room = (psutil.virtual_memory().available - GIB) / GIB
        if not 0 < gib <= room:
            raise BadFault(f"memory-pressure needs 0 < --gib <= {max(0.0, room):.1f} (what "
                           "is available now, less 1 GiB)")


class FaultBook:
    """The faults active on this node and the hooks the service calls."""

    def __init__(self, allowed: bool) -> None:
        self.allowed = allowed
        self._faults: dict[str, Fault] = {}
        self.hang_released = asyncio.Event()
        self._link_free_at = 0.0  # bandwidth fault: when the paced link is free again

    def inject(self, kind: str, ms: float = 0.0, jitter_ms: float = 0.0, p: float = 0.0,
               factor: float = 1.0, duration_s: float = 0.0, seed: int | None = None,
               kbps: float = 0.0, peers: tuple[str, ...] = (), direction: str = "both",
               gib: float = 0.0) -> Fault:
        if not self.allowed:
            raise FaultsNotAllowed("this node refuses fault injection: start it with "
                                   "`mlx-node serve --allow-faults` to allow it")
        direction = direction or "both"
        validate(kind, ms, jitter_ms, p, factor, duration_s, kbps, tuple(peers), direction, gib)
        fault = Fault(uuid.uuid4().hex[:8], kind, ms, jitter_ms, p, factor, duration_s, seed,
                      time.monotonic(), kbps, tuple(peers), direction, gib)
        if kind == "memory-pressure":
            fault.ballast = bytearray(int(gib * GIB))
            for i in range(0, len(fault.ballast), 4096):  # touch every page: really resident
                fault.ballast[i] = 1
        self._faults[fault.id] = fault
        if kind == "hang":
            self.hang_released.clear()
        return fault

    def heal(self, fault_id: str = "") -> list[Fault]:
        if not self.allowed:
            raise FaultsNotAllowed("this node refuses fault injection (no --allow-faults)")
        if fault_id and fault_id not in self._faults:
            raise BadFault(f"no active fault {fault_id!r}")
        healed = [self._faults.pop(f) for f in ([fault_id] if fault_id else list(self._faults))]
        self._update_hang()
        return healed

    def active(self) -> list[Fault]:
        now = time.monotonic()
        for f in [f for f in self._faults.values() if f.expired(now)]:
            del self._faults[f.id]
        self._update_hang()
        return list(self._faults.values())

    def messages(self) -> list[pb.ActiveFault]:
        """The active faults as the service reports them."""
        now = time.monotonic()
        return [pb.ActiveFault(id=f.id, remaining_s=f.remaining(now), spec=pb.FaultSpec(
            kind=f.kind, ms=f.ms, jitter_ms=f.jitter_ms, p=f.p, factor=f.factor,
            duration_s=f.duration_s, seed=f.seed, kbps=f.kbps, peers=f.peers,
            direction=f.direction, gib=f.gib)) for f in self.active()]

    def _update_hang(self) -> None:
        if not any(f.kind == "hang" for f in self._faults.values()):
            self.hang_released.set()

    def _of(self, kind: str) -> list[Fault]:
        return [f for f in self.active() if f.kind == kind]

    # ------------------------------------------------------------ hooks

    async def wait_if_hung(self) -> None:
        """Block while a hang fault is active (re-checking for auto-heal)."""
        while self._of("hang"):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.hang_released.wait(), 0.2)

    def cut_off(self, peer_ids: tuple[str, ...], direction: str) -> bool:
        """True when a partition fault drops traffic with any of these peer names."""
        return any(f.cuts(p, direction) for f in self._of("partition") for p in peer_ids if p)

    async def before_frame(self, sender: str = "", size: int = 0) -> bool:
        """Apply hang/partition/loss/bandwidth/latency to an incoming frame; False = drop."""
        await self.wait_if_hung()
        if self.cut_off((sender,), "from"):
            return False
        for fault in self._of("loss"):
            if fault.rng.random() < fault.p:
                return False
        pace = sum(size * 8 / (f.kbps * 1000) for f in self._of("bandwidth"))
        if pace:  # one link: frames handled at once still queue for it, one after another
            now = asyncio.get_running_loop().time()
            self._link_free_at = max(now, self._link_free_at) + pace
            await asyncio.sleep(self._link_free_at - now)
        delay = sum(max(0.0, f.ms + f.rng.uniform(-f.jitter_ms, f.jitter_ms))
                    for f in self._of("latency"))
        if delay:
            await asyncio.sleep(delay / 1000)
        return True

    async def after_compute(self, compute_s: float) -> None:
        extra = sum((f.factor - 1) * compute_s for f in self._of("slow-compute"))
        if extra:
            await asyncio.sleep(extra)

    def kill_pending(self) -> bool:
        return bool(self._of("kill"))


def exit_now() -> None:
    """The kill fault: leave without cleanup, as a crash would."""
    os._exit(137)
