"""Advertise a node on the local network with zeroconf (mDNS / DNS-SD).

Each node registers `_mlx-node._tcp.local.`; its TXT record carries the node id, name,
gRPC address and port, protocol version and memory budget, so a console can list nodes
before it connects. `--interface IP` (repeatable) restricts the interfaces used (docker
bridges and VPNs are a classic source of unreachable addresses); `--no-advertise` turns
advertising off. A node bound to 127.0.0.1 advertises on loopback only.
"""

from __future__ import annotations

import ipaddress
import logging
import socket

import psutil
from zeroconf import IPVersion
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

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


def txt_record(node_id: str, name: str, port: int, memory_budget: int, ip: str) -> dict:
    return {"id": node_id, "name": name, "port": str(port), "address": f"{ip}:{port}",
            "proto": str(PROTOCOL_VERSION), "version": __version__,
            "budget": str(memory_budget)}


class Advertiser:
    """Registers the node's service and unregisters it (a goodbye packet) on close."""

    def __init__(self, node_id: str, name: str, host: str, port: int, memory_budget: int,
                 interfaces: list[str] | None = None) -> None:
        self.ips = advertised_ips(host, interfaces or [])
        self._zc = AsyncZeroconf(interfaces=self.ips, ip_version=IPVersion.V4Only)
        label = "".join(c if c.isalnum() or c == "-" else "-" for c in name)[:40]
        self.info = AsyncServiceInfo(
            SERVICE_TYPE, f"{label}-{node_id}.{SERVICE_TYPE}",
            addresses=[socket.inet_aton(ip) for ip in self.ips], port=port,
            properties=txt_record(node_id, name, port, memory_budget, self.ips[0]),
            server=f"mlx-node-{node_id}.local.")

    async def start(self) -> None:
        await self._zc.async_register_service(self.info)
        log.info("advertising %s on %s", self.info.name, ", ".join(self.ips))

    async def close(self) -> None:
        try:
            await self._zc.async_unregister_service(self.info)
        finally:
            await self._zc.async_close()
