"""Async client for node services: one NodeClient per node, usable without any UI.

Channels are created lazily inside the running event loop (grpc.aio channels belong
to the loop that made them).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from node.auth import is_loopback, open_channel, read_token, token_metadata
from node.jsonform import to_dict  # noqa: F401 - console modules import it from here
from node.peers import CHANNEL_OPTIONS
from protos import cluster_pb2 as pb
from protos import cluster_pb2_grpc as pb_grpc


class ClusterError(Exception):
    """A cluster call failed; the message says which node and what to do."""


def describe_rpc_error(address: str, error: grpc.aio.AioRpcError) -> str:
    details = error.details() or ""
    if error.code() == grpc.StatusCode.UNAVAILABLE and "next shard" not in details:
        return f"node {address} is unreachable ({details}); is it running?"
    return f"node {address}: {error.code().name}: {details}"


@dataclass
class NodeClient:
    """One node. `token` defaults to env MLX_CLUSTER_TOKEN; `tls_ca` turns on TLS."""

    address: str
    timeout_s: float = 10.0
    token: str | None = None
    tls_ca: Path | None = None

    def __post_init__(self) -> None:
        self._channel: grpc.aio.Channel | None = None
        self.metadata = token_metadata(self.token if self.token is not None else read_token())

    @property
    def stub(self) -> pb_grpc.NodeServiceStub:
        return pb_grpc.NodeServiceStub(self.channel)

    @property
    def channel(self) -> grpc.aio.Channel:
        """The node's channel, opened on first use (in the running event loop)."""
        if self._channel is None:
            self._channel = open_channel(self.address, CHANNEL_OPTIONS, self.tls_ca)
        return self._channel

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    async def _call(self, coro):
        try:
            return await coro
        except grpc.aio.AioRpcError as e:
            raise ClusterError(describe_rpc_error(self.address, e)) from e

    async def info(self) -> pb.NodeInfo:
        """The node's info, with `address` the one this client reached it at (reached())."""
        info = await self._call(self.stub.GetInfo(pb.InfoRequest(), timeout=self.timeout_s))
        return reached(info, self.address)

    async def healthy(self) -> bool:
        if self._channel is None:
            self.stub  # noqa: B018 - opens the channel
        health = health_pb2_grpc.HealthStub(self._channel)
        try:
            reply = await health.Check(health_pb2.HealthCheckRequest(service=""),
                                       timeout=self.timeout_s)
        except grpc.aio.AioRpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    async def metrics(self) -> pb.Metrics:
        return await self._call(self.stub.GetMetrics(pb.MetricsRequest(), timeout=self.timeout_s))

    async def load(self, plan: pb.Plan, options: pb.ModelOptions,
                   timeout_s: float = 900.0, stage: bool = False) -> pb.LoadShardReply:
        """Load the node's shard of `plan`; with `stage`, beside the plan it serves when
        its memory holds both (reply.staged: `activate` switches to it)."""
        request = pb.LoadShardRequest(plan=plan, options=options, stage=stage)
        return await self._call(self.stub.LoadShard(request, timeout=timeout_s,
                                                    metadata=self.metadata))

    async def activate(self, epoch: int) -> pb.LoadShardReply:
        return await self._call(self.stub.Activate(pb.ActivateRequest(epoch=epoch),
                                                   timeout=60.0, metadata=self.metadata))

    async def unload(self) -> bool:
        reply = await self._call(self.stub.UnloadShard(pb.UnloadShardRequest(),
                                                       timeout=self.timeout_s,
                                                       metadata=self.metadata))
        return reply.unloaded

    async def inject(self, spec: pb.FaultSpec) -> pb.FaultReply:
        return await self._call(self.stub.InjectFault(pb.FaultRequest(fault=spec),
                                                      timeout=self.timeout_s,
                                                      metadata=self.metadata))

    async def heal(self, fault_id: str = "") -> pb.FaultReply:
        return await self._call(self.stub.HealFaults(pb.HealRequest(id=fault_id),
                                                     timeout=self.timeout_s,
                                                     metadata=self.metadata))

    async def shutdown(self, reason: str = "") -> bool:
        reply = await self._call(self.stub.Shutdown(pb.ShutdownRequest(reason=reason),
                                                    timeout=self.timeout_s,
                                                    metadata=self.metadata))
        return reply.stopping

    async def generate(self, request: pb.GenerateRequest) -> AsyncIterator[pb.GenerateEvent]:
        call = self.stub.Generate(request)
        try:
            async for event in call:
                yield event
        except grpc.aio.AioRpcError as e:
            raise ClusterError(describe_rpc_error(self.address, e)) from e
        finally:
            call.cancel()


def reached(info: pb.NodeInfo, address: str) -> pb.NodeInfo:
    """A console keeps using the address at which it reached a node: that address goes
    into what it lists and into the plans it makes, so peers use it too. The exception is
    a node reached over loopback (a tunnel, or the console on the node's own machine) that
    reports a network address: its peers on other machines need that one."""
    host = address.rsplit(":", 1)[0].strip("[]")
    own = info.address.rsplit(":", 1)[0].strip("[]")
    if info.address and is_loopback(host) and not is_loopback(own):
        return info
    info.address = address
    return info


async def gather_infos(clients: list[NodeClient]) -> list[pb.NodeInfo | ClusterError]:
    """GetInfo from every node at once; failures come back as ClusterError values."""
    results = await asyncio.gather(*(c.info() for c in clients), return_exceptions=True)
    out: list[pb.NodeInfo | ClusterError] = []
    for r in results:
        if isinstance(r, BaseException) and not isinstance(r, ClusterError):
            raise r
        out.append(r)
    return out
