"""The nodes an HTTP API (node/api.py) fronts, and the entry node among them.

The API knows a list of node addresses: the standalone gateway's --nodes or cluster file,
or, for a node's own API, the nodes of the plan it holds and itself (`plan_addresses`).
It asks them for their info (GetInfo) and sends Generate to the entry node by node.resume's
one rule. The entry is looked up at most every `ttl_s` (a GetInfo to every node per request
would load the nodes that are busy serving), and looked up again at once when a request
could not reach it: after a re-plan the API follows the new entry without a restart.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import grpc

from node.peers import PeerChannels
from node.resume import NoEntry, entry_of
from protos import cluster_pb2 as pb
from protos import cluster_pb2_grpc as pb_grpc

ENTRY_TTL_S = 2.0
INFO_TIMEOUT_S = 5.0


class NoNodeUp(NoEntry):
    """Not one of the known nodes answered."""


def unreachable(address: str, error: grpc.aio.AioRpcError) -> str:
    return f"node {address} is unreachable ({error.details()}); is it running?" if (
        error.code() == grpc.StatusCode.UNAVAILABLE) else (
        f"node {address}: {error.code().name}: {error.details()}")


class Nodes:
    """The known nodes, their channels (`channels`, shared with whoever owns them) and the
    entry node. `addresses()` is asked again on every lookup, so it may change."""

    def __init__(self, addresses: Callable[[], list[str]], channels: PeerChannels,
                 ttl_s: float = ENTRY_TTL_S) -> None:
        self.addresses = addresses
        self.channels = channels
        self.ttl_s = ttl_s
        self._entry: tuple[float, str, pb.NodeInfo] | None = None

    def stub(self, address: str) -> pb_grpc.NodeServiceStub:
        return pb_grpc.NodeServiceStub(self.channels.get(address))

    async def infos(self, addresses: list[str] | None = None
                    ) -> list[tuple[str, pb.NodeInfo | str]]:
        """(address, its info or why it did not answer) for every known node, at once."""
        addresses = self.addresses() if addresses is None else addresses

        async def one(address: str) -> pb.NodeInfo | str:
            try:
                return await self.stub(address).GetInfo(pb.InfoRequest(),
                                                         timeout=INFO_TIMEOUT_S)
            except grpc.aio.AioRpcError as e:
                return unreachable(address, e)

        return list(zip(addresses, await asyncio.gather(*(one(a) for a in addresses))))

    async def live(self) -> list[tuple[str, pb.NodeInfo]]:
        return [(a, i) for a, i in await self.infos() if isinstance(i, pb.NodeInfo)]

    async def entry(self, gone: set[str] = frozenset()) -> tuple[str, pb.NodeInfo]:
        """The entry node's address and info, leaving out `gone`. NoNodeUp when no node
        answers, Pending (node.resume) while a plan loads or the survivors re-plan, NoEntry
        when none serves a plan's first shard and none is coming."""
        now = time.monotonic()
        if self._entry is not None and now - self._entry[0] < self.ttl_s and (
                self._entry[1] not in gone):
            return self._entry[1], self._entry[2]
        found = await self.infos([a for a in self.addresses() if a not in gone])
        up = [(a, i) for a, i in found if isinstance(i, pb.NodeInfo)]
        if not up:
            raise NoNodeUp("; ".join(str(i) for _, i in found) or "no node is known")
        info = entry_of([i for _, i in up])  # Pending while a plan is on its way
        address = next(a for a, i in up if i is info)
        self._entry = (now, address, info)
        return address, info

    async def entry_address(self, gone: set[str]) -> str:
        """node.resume.resumable's `find_entry`."""
        return (await self.entry(gone))[0]

    def forget_entry(self) -> None:
        """The entry may have moved: look again next time."""
        self._entry = None


def plan_addresses(own: str, plan: pb.Plan | None) -> list[str]:
    """A node's own API fronts itself and the nodes of the plan it holds."""
    return list(dict.fromkeys([own, *(s.address for s in plan.shards)] if plan else [own]))
