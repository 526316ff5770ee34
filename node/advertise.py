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


def advertised_ips(host: str, interfaces: list[str]) -> list[str]:
    """The IPv4 addresses to announce for a node bound to `host`."""
    if interfaces:
        return list(interfaces)
    if host not in ("0.0.0.0", "", "::"):
        return [host]
    ips = []
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family == socket.AF_INET and not ipaddress.ip_address(a.address).is_loopback:
                ips.append(a.address)
    return ips or ["127.0.0.1"]


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
