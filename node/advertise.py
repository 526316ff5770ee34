"""Advertise a node on the local network with zeroconf (mDNS / DNS-SD).

Each node registers `_mlx-node._tcp.local.`; its TXT record carries the node id, name,
gRPC address and port, protocol version and memory budget, so a console can list nodes
before it connects. `--interface IP` (repeatable) restricts the interfaces used (docker
bridges and VPNs are a classic source of unreachable addresses); `--no-advertise` turns
advertising off. A node bound to 127.0.0.1 advertises on loopback only. A node with a
cluster token also announces its cluster (a digest of the token), and a node that holds no
plan browses for its cluster's nodes to ask them to take it in (node/membership.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import logging
import socket
from collections.abc import Callable

import psutil
from zeroconf import IPVersion, ServiceStateChange
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from node import PROTOCOL_VERSION, __version__

SERVICE_TYPE = "_mlx-node._tcp.local."
log = logging.getLogger(__name__)


WILDCARDS = ("0.0.0.0", "", "::", "[::]")
# bridges and tunnels that another machine cannot reach this one through
VIRTUAL = ("docker", "br-", "veth", "virbr", "vmnet", "cni", "flannel", "podman", "lxc")


def advertised_ips(host: str, interfaces: list[str]) -> list[str]:
    """The IPv4 addresses to announce for a node bound to `host`: `--interface` when
    given, the bound address unless it is a wildcard, else this machine's addresses on
    the network (interfaces that are up, leaving out loopback, link-local addresses and
    container or VM bridges, unless nothing else is there). Never the wildcard."""
    if interfaces:
        return list(interfaces)
    if host not in WILDCARDS:
        return [host]
    stats = psutil.net_if_stats()
    real, virtual = [], []
    for name, addrs in psutil.net_if_addrs().items():
        if name in stats and not stats[name].isup:
            continue
        for a in addrs:
            if a.family != socket.AF_INET:
                continue
            ip = ipaddress.ip_address(a.address)
            if ip.is_loopback or ip.is_link_local:
                continue
            (virtual if name.startswith(VIRTUAL) else real).append(a.address)
    return real or virtual or ["127.0.0.1"]


def own_host(host: str, interfaces: list[str]) -> str:
    """The host part of the address a node reports about itself (GetInfo, its ready file,
    the plans it is in): one its peers and consoles can reach, not the wildcard it may be
    bound to."""
    return advertised_ips(host, interfaces)[0]


def cluster_id(token: str | None) -> str:
    """The cluster a node announces: one per cluster token (a digest, never the token),
    "" for a node without one (a loopback cluster), which no node joins by zeroconf."""
    return hashlib.sha256(b"mlx-cluster:" + token.encode()).hexdigest()[:16] if token else ""


def txt_record(node_id: str, name: str, port: int, memory_budget: int, ip: str,
               cluster: str = "") -> dict:
    return {"id": node_id, "name": name, "port": str(port), "address": f"{ip}:{port}",
            "proto": str(PROTOCOL_VERSION), "version": __version__,
            "budget": str(memory_budget), **({"cluster": cluster} if cluster else {})}


class Advertiser:
    """Registers the node's service and unregisters it (a goodbye packet) on close."""

    def __init__(self, node_id: str, name: str, host: str, port: int, memory_budget: int,
                 interfaces: list[str] | None = None, cluster: str = "") -> None:
        self.node_id, self.cluster = node_id, cluster
        self.ips = advertised_ips(host, interfaces or [])
        self._zc = AsyncZeroconf(interfaces=self.ips, ip_version=IPVersion.V4Only)
        label = "".join(c if c.isalnum() or c == "-" else "-" for c in name)[:40]
        self.info = AsyncServiceInfo(
            SERVICE_TYPE, f"{label}-{node_id}.{SERVICE_TYPE}",
            addresses=[socket.inet_aton(ip) for ip in self.ips], port=port,
            properties=txt_record(node_id, name, port, memory_budget, self.ips[0], cluster),
            server=f"mlx-node-{node_id}.local.")

    async def start(self) -> None:
        await self._zc.async_register_service(self.info)
        log.info("advertising %s on %s", self.info.name, ", ".join(self.ips))

    def browse_cluster(self, found: Callable[[str], None]) -> None:
        """Tell `found` the address of every other node that announces this node's cluster
        (its token's digest): what a new node asks to join (node/membership.py)."""
        if not self.cluster:
            return

        def changed(zeroconf, service_type: str, name: str, state_change) -> None:
            if state_change is not ServiceStateChange.Removed:
                asyncio.get_running_loop().create_task(self._resolve(name, found))

        self._browser = AsyncServiceBrowser(self._zc.zeroconf, [SERVICE_TYPE],
                                            handlers=[changed])

    async def _resolve(self, name: str, found: Callable[[str], None]) -> None:
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        if not await info.async_request(self._zc.zeroconf, 3000):
            return
        props = {k.decode(): (v or b"").decode() for k, v in info.properties.items()}
        if props.get("cluster") == self.cluster and props.get("id") != self.node_id and (
                props.get("address")):
            found(props["address"])

    async def close(self) -> None:
        if getattr(self, "_browser", None) is not None:
            with contextlib.suppress(Exception):
                await self._browser.async_cancel()
        try:
            await self._zc.async_unregister_service(self.info)
        finally:
            await self._zc.async_close()
