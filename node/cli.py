"""`mlx-node`: the headless node service an operator runs on every machine."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import uuid
from pathlib import Path

from node import PROTOCOL_VERSION, __version__
from node.auth import (
    API_KEY_ENV,
    TOKEN_ENV,
    default_token_file,
    is_loopback,
    read_token,
    server_credentials,
)
from node.blas import parse_cpus, pin, reexec_with_openblas
from node.capabilities import cached_calibration, parse_bytes

log = logging.getLogger("mlx-node")

EPILOG = """\
examples:
  mlx-node serve                          # 127.0.0.1:50051, memory budget = free memory - margin
  mlx-node serve --port 0 --ready-file r.json   # any free port, written to r.json when up
  mlx-node serve --host 0.0.0.0 --name studio-1 --memory-budget 48GiB
  mlx-node serve --api-port 52415        # and the OpenAI-compatible API on :52415

Load models and generate from the console: mlx-cluster load / mlx-cluster generate.
"""


def default_state_dir() -> Path:
    from platformdirs import user_data_dir

    return Path(user_data_dir("mlx-cluster-console")) / "node"


def node_id_for(state_dir: Path) -> str:
    """The node's id, generated once and kept in its state dir."""
    path = state_dir / "node_id"
    try:
        existing = path.read_text().strip()
        if existing:
            return existing
    except FileNotFoundError:
        pass
    state_dir.mkdir(parents=True, exist_ok=True)
    node_id = uuid.uuid4().hex[:12]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(node_id + "\n")
    os.replace(tmp, path)
    return node_id


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlx-node", description="Headless MLX inference node for mlx-cluster-console.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"mlx-node {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the node service until stopped",
                           epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=50051, help="gRPC port; 0 picks a free one")
    serve.add_argument("--name", default=socket.gethostname(), help="display name")
    serve.add_argument("--state-dir", type=Path, default=None,
                       help="where the node keeps its id (default: the user data dir)")
    serve.add_argument("--memory-budget", type=parse_bytes, default=None,
                       help="memory this node may use for shards, e.g. 8GiB "
                            "(default: available memory minus a safety margin)")
    serve.add_argument("--prompt-cache-bytes", type=parse_bytes, default=None,
                       help="bound of each shard's prefix cache, e.g. 2GiB (0: off): the KV "
                            "of recent prompts, so that a request starting with one (the next "
                            "turn of a chat) computes only the rest (default: 1 GiB or an "
                            "eighth of the memory budget, whichever is less)")
    serve.add_argument("--warmup-batches", type=_batch_sizes, default=None,
                       metavar="SIZES",
                       help="decode batch sizes each new shard runs once at load, so that no "
                            "request waits for what MLX compiles on a shape's first use, "
                            "e.g. 1-8,16 (default auto: 1-8,16,32,64 on a GPU, none on a "
                            "CPU, where first use costs little; 'none' turns it off)")
    serve.add_argument("--request-timeout", type=float, default=120.0,
                       help="seconds to wait for a token to come back round the ring")
    serve.add_argument("--ring-port", type=int, default=0,
                       help="TCP port for this node's mlx-ring worker (default: a free port "
                            "picked for each plan); open it between nodes for --backend mlx-ring")
    serve.add_argument("--data-port", type=int, default=0,
                       help="TCP port neighbours send hidden states to (default: a free port, "
                            "told to them by GetInfo); -1: none, they use the Forward RPC")
    serve.add_argument("--api-port", type=int, default=None,
                       help="also serve the OpenAI-compatible HTTP API on this port (on "
                            "--host; 0 picks a free one); it forwards to the plan's entry "
                            "node, whichever node that is")
    serve.add_argument("--api-key", default=None,
                       help="key every /v1 request to --api-port must send as 'Authorization: "
                            "Bearer <key>' (default: env MLX_CLUSTER_API_KEY); needed off "
                            "loopback unless --insecure")
    serve.add_argument("--ready-file", type=Path, default=None,
                       help="write {node_id, address, pid, name, api} as JSON here once "
                            "serving (api: the HTTP API's URL, with --api-port)")
    disc = serve.add_argument_group("discovery")
    disc.add_argument("--interface", action="append", default=[], metavar="IP",
                      help="advertise on this interface address only (repeatable); with "
                           "--host 0.0.0.0 the first is also the address the node reports "
                           "to consoles and peers (default: its addresses on the network)")
    disc.add_argument("--no-advertise", action="store_true",
                      help="do not announce the node with zeroconf (use --nodes or a peers file)")
    disc.add_argument("--join", default="", metavar="HOST:PORT,...",
                      help="ask the plan these nodes serve to take this node in (a plan loaded "
                           "with a strategy takes it in once it has been up the plan's settle "
                           "time); a node that restarts asks the members of its last plan by "
                           "itself")
    disc.add_argument("--peers-file", type=Path, default=None,
                      help="the same as --join, for the nodes of a peers file ([[node]] "
                           'address = "host:port")')
    serve.add_argument("--cpus", default="", metavar="LIST",
                       help="run on these CPUs only, e.g. 0-1 or 2,3: the process, its MLX "
                            "and its BLAS threads (Linux). One many-core host then stands in "
                            "for several machines: give each node its own cores")
    serve.add_argument("--calibrate", action="store_true",
                       help="measure matmul speed for speed-weighted plans (cached per MLX "
                            "version in the state dir)")
    sec = serve.add_argument_group("security")
    sec.add_argument("--token", default=None,
                     help="cluster token required for load/unload/faults/shutdown and between "
                          "nodes (default: env MLX_CLUSTER_TOKEN; off loopback, the file "
                          "`mlx-cluster token new` wrote; on loopback, none)")
    sec.add_argument("--token-file", type=Path, default=None,
                     help="read the token from a file (off loopback the default is the file "
                          "`mlx-cluster token new` writes)")
    sec.add_argument("--insecure", action="store_true",
                     help="serve off loopback without a token (the node starts only with one "
                          "otherwise), and --api-port without a key: anyone who reaches the "
                          "ports may change the node or use the API")
    sec.add_argument("--allow-faults", action="store_true",
                     help="accept fault injection (mlx-cluster inject); refused otherwise")
    sec.add_argument("--tls-cert", type=Path, help="serve TLS with this certificate (PEM)")
    sec.add_argument("--tls-key", type=Path, help="private key for --tls-cert (PEM)")
    sec.add_argument("--tls-ca", type=Path,
                     help="CA (PEM) to verify other nodes' certificates when they serve TLS")
    serve.add_argument("--log-level", default="INFO")
    # tests only: report another protocol version, to see a mixed cluster refused
    serve.add_argument("--protocol-version", type=int, default=PROTOCOL_VERSION,
                       help=argparse.SUPPRESS)
    return parser


async def _serve(args: argparse.Namespace) -> None:
    from node.server import serve
    from node.service import NodeServicer

    state_dir = args.state_dir or default_state_dir()
    node_id = node_id_for(state_dir)
    join = [a.strip() for a in args.join.split(",") if a.strip()]
    if args.peers_file is not None:
        join += _peers(args.peers_file)
    local = is_loopback(args.host)
    # a loopback cluster (local up, the tests) stays token-free unless given one; off
    # loopback the token `mlx-cluster token new` stored is read too
    token = read_token(args.token, args.token_file, default_file=not local)
    if token is None and not local:
        if not args.insecure:
            raise ValueError(
                f"refusing to serve on {args.host} without a cluster token: anyone who can "
                "reach the port could load, unload, shut down or feed this node. Make one "
                "token for the cluster (mlx-cluster token new), copy the file it writes "
                f"({default_token_file()}) to the same place on every machine (or pass "
                f"--token-file FILE / set {TOKEN_ENV}), then start again; or add --insecure "
                "to serve open")
        log.warning("serving OPEN on %s (--insecure): anyone who reaches this port may load, "
                    "unload, inject faults, shut the node down or send it frames", args.host)
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if args.api_port is not None and not api_key and not local and not args.insecure:
        raise ValueError(f"refusing to serve the HTTP API on {args.host} without a key: give "
                         f"--api-key KEY (or {API_KEY_ENV}), which clients send as their "
                         "api_key, or --insecure to serve it open")
    credentials = None
    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        credentials = server_credentials(args.tls_cert, args.tls_key)
    servicer = NodeServicer(node_id, args.name, args.memory_budget, args.request_timeout,
                            token=token, allow_faults=args.allow_faults, peer_ca=args.tls_ca,
                            tls=credentials is not None, ring_port=args.ring_port,
                            protocol_version=args.protocol_version,
                            prompt_cache_bytes=args.prompt_cache_bytes,
                            warmup_batches=args.warmup_batches, state_dir=state_dir)
    servicer.insecure = token is None and not local  # shown as open in status
    if args.calibrate:
        servicer.matmul_gflops = cached_calibration(state_dir)
        log.info("calibrated: %.1f GFLOP/s fp32 matmul", servicer.matmul_gflops)
    server, port = await serve(servicer, args.host, args.port, credentials,
                               (args.tls_cert, args.tls_key) if credentials else None,
                               args.data_port, args.interface)
    log.info("node %s (%s) serving on %s", node_id, args.name, servicer.address)
    api, api_url = None, ""
    if args.api_port is not None:
        from node.api import start_node_api

        try:
            api, servicer.api_port = await start_node_api(servicer, args.host, args.api_port,
                                                          api_key)
        except OSError:
            await server.stop(grace=None)
            raise
        api_url = f"http://{servicer.address.rsplit(':', 1)[0]}:{servicer.api_port}"
        log.info("OpenAI-compatible API on %s/v1", api_url)
    advertiser = None
    if not args.no_advertise:
        from node.advertise import Advertiser, cluster_id

        advertiser = Advertiser(node_id, args.name, args.host, port, servicer.memory_budget,
                                args.interface, cluster_id(token))
        asyncio.get_running_loop().create_task(_advertise(advertiser, servicer))
    if args.ready_file:
        tmp = args.ready_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"node_id": node_id, "address": servicer.address,
                                   "pid": os.getpid(), "name": args.name,
                                   **({"api": api_url} if api_url else {})}))
        os.replace(tmp, args.ready_file)
    stop = servicer.stop
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reaper = loop.create_task(servicer.reap_idle_requests())
    servicer.start_knocking(join)  # a restarted member, or one named --join, asks in
    await stop.wait()
    log.info("shutting down")
    reaper.cancel()
    if api is not None:
        await api.cleanup()  # closes open HTTP streams, which cancels their Generate calls
    if advertiser is not None:
        with contextlib.suppress(Exception):
            await advertiser.close()  # the goodbye packet: browsers drop the node at once
    await server.stop(grace=1.0)
    await servicer.close()


async def _advertise(advertiser, servicer) -> None:
    """Register with zeroconf in the background (it takes a second or two), then look for
    the other nodes of this node's cluster, to ask to join their plan while it holds none."""
    try:
        await advertiser.start()
        servicer.advertising = True
        advertiser.browse_cluster(servicer.knock_on)
    except Exception as e:  # no multicast here: the node still serves, by address
        log.warning("zeroconf advertising failed (%s); name this node with --nodes instead", e)


def _peers(path: Path) -> list[str]:
    """host:port of each [[node]] of a peers file."""
    import tomllib

    try:
        nodes = tomllib.loads(path.read_text()).get("node", [])
        return [str(n["address"]) for n in nodes]
    except (OSError, tomllib.TOMLDecodeError, TypeError, KeyError, AttributeError) as e:
        raise ValueError(f"peers file {path}: {e}; write one [[node]] table per node with "
                         'address = "host:port"') from e


def _batch_sizes(text: str) -> list[int] | None:
    from node.warmup import parse_batch_sizes

    try:
        return parse_batch_sizes(text)
    except ValueError as e:  # argparse shows only this kind's message
        raise argparse.ArgumentTypeError(str(e)) from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        if args.cpus:
            try:
                pin(parse_cpus(args.cpus))
            except (ValueError, OSError) as e:
                print(f"mlx-node: {e}", file=sys.stderr)
                return 1
        # before MLX is imported; a no-op where it can't help
        reexec_with_openblas(force=bool(args.cpus))
        logging.basicConfig(level=args.log_level.upper(),
                            format="%(asctime)s %(name)s %(levelname)s %(message)s")
        try:
            asyncio.run(_serve(args))
        except (OSError, ValueError) as e:
            print(f"mlx-node: {e}", file=sys.stderr)
            return 1
        # Everything the node owns is closed by now (servers, streams, zeroconf, the MLX
        # thread's work). Leave without the interpreter's teardown: the native threads of
        # MLX and gRPC, destroyed by static destructors at exit, sometimes abort the process
        # ("terminate called without an active exception"; seen in about 1 of 18 nodes
        # stopped together with their peers), which turns a clean SIGTERM into SIGABRT.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
