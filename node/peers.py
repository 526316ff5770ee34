"""Channels to other nodes: the gRPC options every channel of the project uses, and the
one cache of channels a node keeps to its peers.

A node talks to the same few peers from several places (its data link asking the next
shard for its data port, or its Forward stream to it; the coordinator's heartbeats and
loads; an mlx-ring rank 0 waking the others).
grpc.aio channels multiplex calls, so one channel per peer address serves all of them;
the cache belongs to the node service and lives as long as it does. A peer declared dead
is forgotten, so that nothing keeps reconnecting to it.
"""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import grpc

from node.auth import open_channel

MAX_MESSAGE_BYTES = 512 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # a peer that restarts on a LAN is found again within a second, not after gRPC's
    # default backoff of up to two minutes
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


class PeerChannels:
    """One channel per peer address, opened on first use (in the running event loop:
    grpc.aio channels belong to the loop that made them)."""

    def __init__(self, ca: Path | None = None) -> None:
        self._ca = ca
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._tls: ssl.SSLContext | None = None

    def get(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = open_channel(address, CHANNEL_OPTIONS,
                                                             self._ca)
        return channel

    def data_tls(self) -> ssl.SSLContext | None:
        """The TLS of links to peers' data ports (node/datalink.py): with a CA, as the
        channels use it (the peer's certificate checked against it); else none."""
        if self._ca is not None and self._tls is None:
            self._tls = ssl.create_default_context(cafile=str(self._ca))
        return self._tls

    def forget(self, address: str) -> None:
        """Close the channel to a peer that is gone (calls on it fail at once)."""
        channel = self._channels.pop(address, None)
        if channel is not None:
            asyncio.get_running_loop().create_task(channel.close())

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close()
