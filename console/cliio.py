"""What every `mlx-cluster` command shares (console/cli.py): printing data or text,
the connection settings, and the nodes a command works on (--nodes, a peers file, the
local cluster file or zeroconf)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from console import ops
from console.client import ClusterError
from console.ops import Connection
from console.parser import DISCOVER_S
from node.auth import read_token


def eprint(*args: Any) -> None:
    print(*args, file=sys.stderr, flush=True)


def emit(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=2) if args.json else text, flush=True)


def connection_of(args: argparse.Namespace) -> Connection:
    """--token / --token-file / --tls-ca as a Connection (a ValueError for an unreadable
    token file)."""
    token, token_file = getattr(args, "token", None), getattr(args, "token_file", None)
    return Connection(token=read_token(token, token_file) if token or token_file else None,
                      tls_ca=getattr(args, "tls_ca", None))


def node_addresses(args: argparse.Namespace, connection: Connection) -> list[str]:
    """Nodes from --nodes, else --peers-file FILE, else the cluster file, else zeroconf."""
    from console.discovery import discover, read_peers_file
    from console.local import cluster_file, read_cluster

    if getattr(args, "nodes", None):
        return [a.strip() for a in args.nodes.split(",") if a.strip()]
    if getattr(args, "peers_file", None):
        return read_peers_file(args.peers_file)
    cluster = read_cluster()
    if cluster and cluster.get("nodes"):
        return [n["address"] for n in cluster["nodes"]]
    eprint(f"no --nodes, --peers-file or cluster file ({cluster_file()}); browsing zeroconf "
           f"for {DISCOVER_S:.0f} s ...")
    found = asyncio.run(discover(DISCOVER_S, client_options=connection.options()))
    if not found:
        raise ClusterError("no nodes found: start some (`mlx-cluster local up -n 3`, or "
                           "`mlx-node serve` on each machine) or name them with --nodes "
                           "host:port,... or --peers-file FILE")
    return [i.address for i in found]


def on_nodes(addresses: list[str], connection: Connection, fn):
    """Run `await fn(clients)` with one client per address; the result."""
    async def run():
        async with ops.connect(addresses, connection) as clients:
            return await fn(clients)

    return asyncio.run(run())
