"""Finding nodes: a zeroconf browser, static peers (file or --nodes), one event stream.

Every node a source names is confirmed with GetInfo + a health check before it is
reported up; confirmed nodes are re-checked every `check_interval_s`, so a node that dies
without a goodbye packet still goes down within a few seconds. Two live addresses that
claim the same node id (a copied state dir) are reported as a conflict, not merged.
"""

from __future__ import annotations

import asyncio
import logging
import time
import tomllib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from console.client import ClusterError, NodeClient
from protos import cluster_pb2 as pb

log = logging.getLogger(__name__)
SERVICE_TYPE = "_mlx-node._tcp.local."


@dataclass
class NodeEvent:
    kind: str  # "up" | "down" | "changed" | "conflict"
    address: str
    node_id: str = ""
    info: pb.NodeInfo | None = None
    source: str = ""  # "mdns" | "static"
    detail: str = ""
    at: float = field(default_factory=time.time)


def read_peers_file(path: Path | str) -> list[str]:
    """Addresses from a TOML peers file: [[node]] address = "host:port" (name optional)."""
    path = Path(path).expanduser()
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ClusterError(f"peers file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ClusterError(f"peers file {path} is not valid TOML: {e}") from None
    nodes = data.get("node", [])
    if not isinstance(nodes, list) or not all(isinstance(n, dict) and "address" in n
                                              for n in nodes):
        raise ClusterError(f"peers file {path}: write one [[node]] table per node with "
                           'address = "host:port"')
    return [str(n["address"]) for n in nodes]


class Discovery:
    """Merges mDNS and static sources into up/down/changed/conflict events."""

    def __init__(self, static: list[str] | None = None, mdns: bool = True,
                 interfaces: list[str] | None = None, check_interval_s: float = 1.0,
                 client_options: dict | None = None) -> None:
        self.static = list(static or [])
        self.mdns = mdns
        self.interfaces = interfaces
        self.check_interval_s = check_interval_s
        self.client_options = client_options or {}
        self.up: dict[str, pb.NodeInfo] = {}  # address -> last confirmed info
        self.sources: dict[str, str] = {}  # address -> source
        self._events: asyncio.Queue[NodeEvent] = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []
        self._clients: dict[str, NodeClient] = {}
        self._names: dict[str, str] = {}  # mDNS service name -> address
        self._zc = None
        self._browser = None

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        for address in self.static:
            self._candidate(address, "static")
        if self.mdns:
            from zeroconf import IPVersion
            from zeroconf.asyncio import AsyncServiceBrowser, AsyncZeroconf

            kwargs = {"interfaces": self.interfaces} if self.interfaces else {}
            self._zc = AsyncZeroconf(ip_version=IPVersion.V4Only, **kwargs)
            self._browser = AsyncServiceBrowser(self._zc.zeroconf, [SERVICE_TYPE],
                                                handlers=[self._on_service])
        self._tasks.append(asyncio.get_running_loop().create_task(self._recheck_loop()))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._browser is not None:
            await self._browser.async_cancel()
        if self._zc is not None:
            await self._zc.async_close()
        await asyncio.gather(*(c.close() for c in self._clients.values()))

    async def __aenter__(self) -> Discovery:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def events(self) -> AsyncIterator[NodeEvent]:
        while True:
            yield await self._events.get()

    async def next_event(self, timeout: float) -> NodeEvent | None:
        try:
            return await asyncio.wait_for(self._events.get(), timeout)
        except TimeoutError:
            return None

    # ------------------------------------------------------------ sources

    def _on_service(self, zeroconf, service_type: str, name: str, state_change) -> None:
        from zeroconf import ServiceStateChange

        loop = asyncio.get_running_loop()
        if state_change is ServiceStateChange.Removed:
            loop.create_task(self._removed(name))
        else:
            loop.create_task(self._resolve(zeroconf, service_type, name))

    async def _resolve(self, zeroconf, service_type: str, name: str) -> None:
        from zeroconf.asyncio import AsyncServiceInfo

        info = AsyncServiceInfo(service_type, name)
        if not await info.async_request(zeroconf, 3000):
            return
        props = {k.decode(): (v or b"").decode() for k, v in info.properties.items()}
        address = props.get("address")
        if not address:
            ips = info.parsed_addresses()
            if not ips:
                return
            address = f"{ips[0]}:{info.port}"
        self._names[name] = address
        self._candidate(address, "mdns")

    async def _removed(self, name: str) -> None:
        address = self._names.pop(name, None)
        if address and address in self.up:
            info = self.up.pop(address)
            self._emit(NodeEvent("down", address, info.node_id, info, "mdns",
                                 "the node said goodbye"))

    def _candidate(self, address: str, source: str) -> None:
        self.sources.setdefault(address, source)
        asyncio.get_running_loop().create_task(self._confirm(address))

    # ------------------------------------------------------------ confirmation

    def _client(self, address: str) -> NodeClient:
        if address not in self._clients:
            self._clients[address] = NodeClient(address, timeout_s=2.0, **self.client_options)
        return self._clients[address]

    async def _confirm(self, address: str) -> None:
        client = self._client(address)
        try:
            info = await client.info()
            healthy = await client.healthy()
        except ClusterError as e:
            info, healthy = None, False
            detail = str(e)
        else:
            detail = "" if healthy else "health check failed"
        before = self.up.get(address)
        source = self.sources.get(address, "")
        if info is None or not healthy:
            if before is not None:
                del self.up[address]
                self._emit(NodeEvent("down", address, before.node_id, before, source, detail))
            return
        twin = next((a for a, i in self.up.items() if i.node_id == info.node_id
                     and a != address), None)
        if twin is not None:
            self._emit(NodeEvent("conflict", address, info.node_id, info, source,
                                 f"node id {info.node_id} is also used by {twin}; give one "
                                 "node a fresh --state-dir"))
            return
        self.up[address] = info
        if before is None:
            self._emit(NodeEvent("up", address, info.node_id, info, source))
        elif _summary(before) != _summary(info):
            self._emit(NodeEvent("changed", address, info.node_id, info, source))

    async def _recheck_loop(self) -> None:
        while True:
            await asyncio.sleep(self.check_interval_s)
            known = set(self.up) | set(self.static)
            await asyncio.gather(*(self._confirm(a) for a in known), return_exceptions=True)

    def _emit(self, event: NodeEvent) -> None:
        log.debug("%s %s %s", event.kind, event.address, event.detail)
        self._events.put_nowait(event)


def _summary(info: pb.NodeInfo) -> tuple:
    """The fields whose change is worth a 'changed' event."""
    return (info.name, info.shard.model, info.shard.start_layer, info.shard.end_layer,
            info.shard.epoch, info.capabilities.memory_budget, len(info.faults))


async def discover(timeout_s: float, static: list[str] | None = None, mdns: bool = True,
                   interfaces: list[str] | None = None,
                   client_options: dict | None = None) -> list[pb.NodeInfo]:
    """Browse for `timeout_s` seconds and return the confirmed nodes, sorted by name."""
    async with Discovery(static, mdns, interfaces, client_options=client_options) as d:
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            await d.next_event(left)
        return sorted(d.up.values(), key=lambda i: (i.name, i.address))
