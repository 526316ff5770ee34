"""Starting a node's servers: the gRPC service (the node service, gRPC's standard health
service, the token check on mutating calls, TLS when configured) and the data port that
neighbours send hidden states to (node/datalink.py), each on its bound port (port 0 picks
one).
"""

from __future__ import annotations

from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from node.advertise import own_host
from node.auth import TokenInterceptor
from node.datalink import DataServer, server_ssl
from node.peers import CHANNEL_OPTIONS
from node.service import NodeServicer
from protos import cluster_pb2_grpc as pb_grpc

SERVICE_NAME = "mlxcluster.NodeService"


async def serve(servicer: NodeServicer, host: str, port: int,
                credentials: grpc.ServerCredentials | None = None,
                tls_files: tuple[Path, Path] | None = None,
                data_port: int = 0, interfaces: list[str] = ()
                ) -> tuple[grpc.aio.Server, int]:
    """Start the gRPC server and the data port; returns the server and its bound port
    (useful with port 0). `tls_files` (certificate, key) are what `credentials` were made
    of: the data port serves TLS with them. A node serving TLS without them, or with
    `data_port` -1, opens no data port: its upstream neighbour uses the Forward RPC.
    `interfaces` (--interface) name the address the node reports when `host` is a
    wildcard (node.advertise.own_host)."""
    interceptors = [TokenInterceptor(servicer.token)] if servicer.token else []
    # no SO_REUSEPORT: a second node on a taken port must fail, not share it silently
    server = grpc.aio.server(options=[*CHANNEL_OPTIONS, ("grpc.so_reuseport", 0)],
                             interceptors=interceptors)
    pb_grpc.add_NodeServiceServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    try:
        if credentials is not None:
            bound = server.add_secure_port(f"{host}:{port}", credentials)
        else:
            bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError as e:  # grpc's way of saying the address is taken or invalid
        raise OSError(f"cannot bind {host}:{port} ({e}); is another node using the port?") from e
    if bound == 0:
        raise OSError(f"cannot bind {host}:{port}")
    if data_port >= 0 and (credentials is None or tls_files is not None):
        data = DataServer(servicer.frame, servicer.metrics, servicer.token,
                          server_ssl(*tls_files) if tls_files is not None else None)
        try:
            servicer.data_port = await data.start(host, data_port)
        except OSError as e:
            raise OSError(f"cannot bind the data port {host}:{data_port} ({e.strerror or e})"
                          ) from e
        servicer.data_server = data
    await server.start()
    # what the node reports about itself: a routable address, never a wildcard it binds
    servicer.address = f"{own_host(host, list(interfaces))}:{bound}"
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, bound
