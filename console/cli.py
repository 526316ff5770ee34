"""`mlx-cluster`: the command line over console.ops (the dashboard is console/tui).

Every command takes --json: data on stdout, diagnostics on stderr, non-zero exit on
failure. Nodes come from --nodes host:port,... or the cluster file `local up` wrote.
The options and help text are in console/parser.py; this module runs the commands and
prints their results.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time

from console import ops, views
from console.client import ClusterError, NodeClient, gather_infos, to_dict
from console.cliio import connection_of, emit, eprint, node_addresses, on_nodes
from console.ops import Connection
from console.parser import backend_list, build_parser, int_list
from node.auth import API_KEY_ENV, default_token_file, is_loopback, new_token, read_token
from protos import cluster_pb2 as pb

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


# ---------------------------------------------------------------- local


def cmd_local(args: argparse.Namespace, connection: Connection) -> int:
    from console import local

    if args.local_command == "up":
        budgets = args.memory_budgets.split(",") if args.memory_budgets else None
        node_args = ["--allow-faults"] if args.allow_faults else []
        if args.token_file:
            node_args += ["--token-file", str(args.token_file)]
        cluster = local.up(args.n, budgets, log=eprint if not args.json else lambda m: None,
                           node_args=node_args, cpus_per_node=args.cpus_per_node,
                           oversubscribe=args.oversubscribe)
        lines = [f"{n['name']:10} {n['address']:22} pid {n['pid']:<8} id {n['node_id']}"
                 for n in cluster["nodes"]]
        emit(args, cluster, "\n".join(lines) + f"\ncluster file: {local.cluster_file()}")
    elif args.local_command == "down":
        stopped = local.down()
        emit(args, {"stopped": stopped},
             f"stopped {len(stopped)} node(s)" if stopped else "no local cluster is running")
    else:
        cluster = local.read_cluster()
        live = {n["pid"] for n in local.live_nodes(cluster)} if cluster else set()
        nodes = [dict(n, running=n["pid"] in live) for n in (cluster or {}).get("nodes", [])]
        text = "\n".join(f"{n['name']:10} {n['address']:22} pid {n['pid']:<8} "
                         f"{'running' if n['running'] else 'gone'}" for n in nodes)
        emit(args, {"cluster_file": str(local.cluster_file()), "nodes": nodes},
             text or "no local cluster (start one: mlx-cluster local up -n 3)")
    return EXIT_OK


# ---------------------------------------------------------------- status


def cmd_token(args: argparse.Namespace, connection: Connection) -> int:
    path = default_token_file()
    if args.token_command == "path":
        print(path)
        return EXIT_OK
    try:
        path = new_token(args.file, args.force)
    except FileExistsError as e:
        eprint(f"error: {e}")
        return EXIT_FAIL
    eprint(f"wrote a new cluster token to {path} (readable by you only).\n"
           f"Copy it to the same path on every machine of the cluster, e.g.\n"
           f"  scp {path} other-host:{path}\n"
           "then start each node off loopback as usual (mlx-node serve --host 0.0.0.0); it "
           "reads the token from there, and so does mlx-cluster."
           + (f"\n(a file elsewhere: pass --token-file {path} to both)" if args.file else ""))
    return EXIT_OK


def cmd_status(args: argparse.Namespace, connection: Connection) -> int:
    async def run(clients: list[NodeClient]) -> list[dict]:
        infos = await gather_infos(clients)
        health = await asyncio.gather(*(c.healthy() for c in clients))
        rows = []
        for client, info, ok in zip(clients, infos, health):
            if isinstance(info, ClusterError):
                rows.append({"address": client.address, "up": False, "error": str(info)})
            else:
                rows.append({"address": client.address, "up": ok, **to_dict(info)})
        return rows

    rows = on_nodes(node_addresses(args, connection), connection, run)
    emit(args, {"nodes": rows}, views.status_text(rows))
    return EXIT_OK if all(r.get("up") for r in rows) else EXIT_FAIL


# ---------------------------------------------------------------- load / unload


def cmd_plan(args: argparse.Namespace, connection: Connection) -> int:
    infos = on_nodes(node_addresses(args, connection), connection, ops.live_infos)
    plan, source = ops.partition(infos, args.model, args.dtype, args.layers, args.strategy,
                                 args.backend)
    proto = ops.proto_plan(plan, args.model, 0, args.backend, infos)
    budgets = {i.node_id: i.capabilities.memory_budget for i in infos}
    speeds = {i.node_id: i.capabilities.matmul_gflops for i in infos}
    dtype = source.dtype or source.form
    emit(args, {"model": args.model, "strategy": plan.strategy, "n_layers": plan.n_layers,
                "context_length": plan.context, "dtype": dtype,
                "shards": [dict(r, budget_bytes=budgets[r["node"]])
                           for r in ops.plan_rows(proto, speeds)]},
         views.plan_table(proto, budgets, dtype, speeds))
    return EXIT_OK


def cmd_load(args: argparse.Namespace, connection: Connection) -> int:
    async def run(clients):
        return await ops.load_plan(clients, args.model, args.dtype, args.layers,
                                   args.strategy, progress=eprint, backend=args.backend,
                                   auto_reform=args.auto_reform,
                                   auto_rejoin=False if args.no_auto_rejoin else None,
                                   rejoin_settle_s=args.rejoin_settle,
                                   microbatches=args.microbatches)

    plan, shards = on_nodes(node_addresses(args, connection), connection, run)
    data = {"plan": to_dict(plan), "shards": [to_dict(s) for s in shards]}
    text = "\n".join(f"{p.address:22} layers {p.start_layer:>3}-{p.end_layer:<3} "
                     f"{s.weight_bytes / 2**20:8.1f} MiB  {s.form}"
                     for p, s in zip(plan.shards, shards))
    emit(args, data, f"{plan.model} epoch {plan.epoch}\n{text}")
    return EXIT_OK


def cmd_rebalance(args: argparse.Namespace, connection: Connection) -> int:
    plan, shards, left_out = on_nodes(node_addresses(args, connection), connection,
                                      lambda clients: ops.rebalance(clients, progress=eprint))
    emit(args, {"plan": to_dict(plan), "left_out": left_out},
         f"{plan.model} epoch {plan.epoch} over {len(plan.shards)} node(s): " + ", ".join(
             f"{s.name or s.address} {s.start_layer}-{s.end_layer}" for s in plan.shards))
    if left_out:  # a plan that shrank because a node moved must not look like success
        eprint(f"left out {len(left_out)} node(s) that did not answer: " + "; ".join(left_out)
               + ". A node that restarted on another address rejoins by itself (auto-rejoin); "
               "or name its address with --nodes and rebalance again")
        return EXIT_FAIL
    return EXIT_OK


def cmd_unload(args: argparse.Namespace, connection: Connection) -> int:
    async def run(clients):
        return await asyncio.gather(*(c.unload() for c in clients))

    addresses = node_addresses(args, connection)
    done = on_nodes(addresses, connection, run)
    emit(args, {"unloaded": [a for a, d in zip(addresses, done) if d]},
         f"unloaded {sum(done)} shard(s)")
    return EXIT_OK


# ---------------------------------------------------------------- generate


def generate_request(args: argparse.Namespace) -> pb.GenerateRequest:
    sampling = pb.SamplingParams(temperature=args.temperature, top_p=args.top_p)
    if args.seed is not None:
        sampling.seed = args.seed
    return pb.GenerateRequest(prompt=args.prompt, chat=args.chat, max_tokens=args.max_tokens,
                              sampling=sampling, ignore_eos=args.ignore_eos)


def cmd_generate(args: argparse.Namespace, connection: Connection) -> int:
    def show(text: str) -> None:
        if not args.json:
            print(text, end="", flush=True)

    resumes: list[str] = []  # said after the answer, which must read as one piece

    def resumed(address: str, tokens: int) -> None:
        resumes.append(f"the entry node was lost after {tokens} token(s); the answer went "
                       f"on from {address}")

    result = on_nodes(node_addresses(args, connection), connection,
                      lambda cl: ops.generate(cl, generate_request(args), show, resumed))
    if args.json:
        print(json.dumps(dict(result.to_dict(), resumed=resumes), indent=2))
    else:
        print()
        eprint(f"[{result.completion_tokens} tokens, {result.finish_reason}; "
               f"TTFT {result.ttft_s * 1000:.0f} ms, {result.tokens_per_s:.1f} tok/s "
               f"over {len(result.shards)} shard(s)" + "".join(f"; {r}" for r in resumes)
               + "]")
    return EXIT_OK


# ---------------------------------------------------------------- demo


def cmd_demo(args: argparse.Namespace, connection: Connection) -> int:
    """Start a 3-node local cluster, load the bundled model, stream answers, then open the
    dashboard (in a terminal; without one, stop after the answers)."""
    from console import local

    cluster = local.read_cluster()
    if not cluster or not local.live_nodes(cluster):
        eprint("starting a 3-node local cluster on 127.0.0.1 ...")
        local.up(3, log=eprint)
    addresses = node_addresses(args, connection)

    async def run(clients):
        await ops.load_plan(clients, "smollm2-135m", "", 0, "memory", progress=eprint)
        for question in DEMO_PROMPTS:
            print(f"\n> {question}\n", flush=True)
            request = pb.GenerateRequest(prompt=question, chat=True, max_tokens=48)
            result = await ops.generate(clients, request,
                                        lambda t: print(t, end="", flush=True))
            eprint(f"\n[{result.completion_tokens} tokens, TTFT {result.ttft_s * 1000:.0f} "
                   f"ms, {result.tokens_per_s:.1f} tok/s across {len(result.shards)} nodes]")

    on_nodes(addresses, connection, run)
    if sys.stdin.isatty() and sys.stdout.isatty():
        eprint("\nopening the dashboard (q quits; the cluster keeps running) ...")
        time.sleep(1.5)
        from console.tui.app import run_dashboard

        run_dashboard(addresses, False, connection)
    eprint("\nthe cluster is still running; try:\n"
           "  .venv/bin/mlx-cluster                  # the dashboard\n"
           "  .venv/bin/mlx-cluster generate --chat --prompt 'Name three planets.'\n"
           "  .venv/bin/mlx-cluster status\n"
           "  .venv/bin/mlx-cluster local down       # stop it")
    return EXIT_OK


DEMO_PROMPTS = ("What is the capital of France?", "What is the boiling point of water in Celsius?")


def fault_rows(active) -> list[dict]:
    return [{"id": f.id, "kind": f.spec.kind, "remaining_s": f.remaining_s,
             "spec": to_dict(f.spec)} for f in active]


def cmd_inject(args: argparse.Namespace, connection: Connection) -> int:
    spec = pb.FaultSpec(kind=args.fault, ms=args.ms, jitter_ms=args.jitter, p=args.p,
                        factor=args.factor, duration_s=args.duration, kbps=args.kbps,
                        direction=args.direction, gib=args.gib)
    if args.seed is not None:
        spec.seed = args.seed

    async def run(clients):
        (client,) = await ops.pick_nodes(clients, [args.node], connection)
        if args.peers:  # partitions match node ids and addresses: name both
            for peer in await ops.pick_nodes(clients, args.peers.split(","), connection):
                info = await peer.info()
                spec.peers.extend([info.node_id, peer.address])
        return client.address, await client.inject(spec)

    address, reply = on_nodes(node_addresses(args, connection), connection, run)
    rows = fault_rows(reply.active)
    emit(args, {"node": address, "active": rows},
         f"{address}: {args.fault} injected; active: "
         + ", ".join(f"{r['kind']} ({r['id']})" for r in rows))
    return EXIT_OK


def cmd_heal(args: argparse.Namespace, connection: Connection) -> int:
    if not args.node and not args.all:
        args.all = True

    async def run(clients):
        chosen = await ops.pick_nodes(clients, [] if args.all else [args.node], connection)
        replies = await asyncio.gather(*(c.heal() for c in chosen), return_exceptions=True)
        return [(c.address, r) for c, r in zip(chosen, replies)]

    results = on_nodes(node_addresses(args, connection), connection, run)
    data = [{"node": a, "error": str(r)} if isinstance(r, BaseException)
            else {"node": a, "active": fault_rows(r.active)} for a, r in results]
    emit(args, {"nodes": data}, "\n".join(
        f"{d['node']}: {d.get('error', 'healed')}" for d in data))
    return EXIT_FAIL if any("error" in d for d in data) else EXIT_OK


def cmd_shutdown(args: argparse.Namespace, connection: Connection) -> int:
    if not args.node and not args.all:
        raise ClusterError("name the nodes to stop, or pass --all")

    async def run(clients):
        chosen = await ops.pick_nodes(clients, [] if args.all else args.node, connection)
        done = await asyncio.gather(*(c.shutdown("mlx-cluster shutdown") for c in chosen))
        return [c.address for c, ok in zip(chosen, done) if ok]

    stopped = on_nodes(node_addresses(args, connection), connection, run)
    emit(args, {"stopping": stopped}, f"stopping {len(stopped)} node(s): {', '.join(stopped)}")
    return EXIT_OK


def cmd_models(args: argparse.Namespace, connection: Connection) -> int:
    from node.models import spec_lines

    lines = spec_lines()
    width = max(len(spec) for spec, _ in lines)
    emit(args, [{"spec": spec, "description": what} for spec, what in lines],
         "\n".join(f"{spec:<{width}}  {what}" for spec, what in lines)
         + "\n\nany mlx-lm architecture whose layers keep a key/value cache can be split; "
           "--layers N shortens a synthetic model")
    return EXIT_OK


def cmd_discover(args: argparse.Namespace, connection: Connection) -> int:
    from console.discovery import discover, read_peers_file

    static = [a.strip() for a in (args.nodes or "").split(",") if a.strip()]
    if args.peers_file:
        static += read_peers_file(args.peers_file)
    found = asyncio.run(discover(args.timeout, static, not args.no_mdns,
                                 args.interface or None, connection.options()))
    emit(args, {"nodes": [to_dict(i) for i in found]},
         views.found_text(found) or f"no nodes found in {args.timeout:.0f} s")
    return EXIT_OK if found else EXIT_FAIL


def cmd_bench(args: argparse.Namespace, connection: Connection) -> int:
    from console.bench import run_bench
    from console.workload import Workload

    if not 0 < args.fault_at < 1:
        raise ClusterError("--fault-at is a fraction of the requests, between 0 and 1")
    work = Workload(model=args.model, prompt_tokens=args.prompt_tokens,
                    gen_tokens=args.gen_tokens, requests=args.requests,
                    concurrency=int_list(args.concurrency, "--concurrency"),
                    warmup=args.warmup, repeats=args.repeats, strategy=args.strategy,
                    seed=args.seed, backends=backend_list(args.backend),
                    microbatches=args.microbatches, cpus_per_node=args.cpus_per_node,
                    oversubscribe=args.oversubscribe)
    sweep = int_list(args.nodes_sweep, "--nodes-sweep") if args.nodes_sweep else None
    if args.scenario == "chaos":
        from console.chaos import run_local_chaos

        doc = run_local_chaos(work, (sweep or [3])[-1], args.duration, args.local, eprint)
        args.out.write_text(json.dumps(doc, indent=1))
        emit(args, doc, views.chaos_text(doc["chaos"]) + f"\nresults: {args.out}")
        return EXIT_OK if views.chaos_passed(doc["chaos"]) else EXIT_FAIL
    addresses = None if args.local else node_addresses(args, connection)
    doc = run_bench(work, addresses, sweep, args.local, connection, args.scenario or "",
                    args.fault_at, positions=args.node)
    args.out.write_text(json.dumps(doc, indent=1))
    emit(args, doc, views.bench_text(doc) + f"\nresults: {args.out}")
    return EXIT_OK


def cmd_report(args: argparse.Namespace, connection: Connection) -> int:
    from console.report import load_results, write_report

    docs = load_results(args.results)
    written = write_report(docs, args.output)
    emit(args, {"report": str(args.output), "files": [str(p) for p in written]},
         f"report: {args.output}" + (f" (+ {len(written) - 1} chart(s))"
                                     if len(written) > 1 else ""))
    return EXIT_OK


def dashboard_sources(args: argparse.Namespace) -> tuple[list[str], bool]:
    """Static addresses and whether to browse zeroconf, for the dashboard."""
    from console.discovery import read_peers_file
    from console.local import read_cluster

    if args.nodes:
        return [a.strip() for a in args.nodes.split(",") if a.strip()], args.mdns
    if args.peers_file:
        return read_peers_file(args.peers_file), args.mdns
    cluster = read_cluster()
    if cluster and cluster.get("nodes"):
        return [n["address"] for n in cluster["nodes"]], args.mdns
    return [], True


def cmd_dashboard(args: argparse.Namespace, connection: Connection) -> int:
    from console.tui.app import run_dashboard

    static, mdns = dashboard_sources(args)
    return run_dashboard(static, mdns, connection, args.interface or None)


def cmd_serve_api(args: argparse.Namespace, connection: Connection) -> int:
    from console.gateway import serve

    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if not api_key and not args.insecure and not is_loopback(args.host):
        eprint(f"error: serve-api on {args.host} would let anyone on the network use the "
               f"cluster; give it a key: --api-key KEY (or {API_KEY_ENV}=KEY), e.g. "
               "KEY=$(python -c 'import secrets; print(secrets.token_urlsafe(32))'), and "
               "set it as the clients' api_key; or --insecure to serve it open")
        return EXIT_USAGE
    addresses = node_addresses(args, connection)

    def ready(url: str) -> None:
        guard = "needs its API key" if api_key else (
            "OPEN: no API key (--insecure)" if not is_loopback(args.host) else "no API key")
        eprint(f"OpenAI-compatible API on {url}/v1 for {len(addresses)} node(s) "
               f"(POST /v1/chat/completions, /v1/completions; GET /v1/models, /health, "
               f"/v1/cluster; {guard}); Ctrl-C stops it")
        if args.ready_file:
            args.ready_file.write_text(json.dumps({"url": url, "pid": os.getpid()}))

    # the gateway guards its mutating endpoint with the same token the nodes use, wherever
    # it came from (--token, --token-file or MLX_CLUSTER_TOKEN)
    serve(addresses, args.host, args.port, read_token(args.token, args.token_file),
          connection, args.max_body_bytes, ready, api_key)
    return EXIT_OK


COMMANDS = {"token": cmd_token, "local": cmd_local, "discover": cmd_discover,
            "dashboard": cmd_dashboard, "serve-api": cmd_serve_api,
            "bench": cmd_bench, "report": cmd_report,
            "status": cmd_status, "plan": cmd_plan, "load": cmd_load, "unload": cmd_unload,
            "rebalance": cmd_rebalance, "models": cmd_models,
            "generate": cmd_generate, "inject": cmd_inject,
            "heal": cmd_heal, "shutdown": cmd_shutdown, "demo": cmd_demo}


def _terminated(signum: int, frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        if not sys.stdout.isatty():
            parser.print_help()
            return EXIT_OK
        args = parser.parse_args(["dashboard"])
    if args.command != "dashboard":  # (Textual handles its own signals)
        # SIGTERM (`timeout`, a service manager) unwinds like Ctrl-C, so that what a
        # command started is stopped: `bench --local` takes its local clusters down
        signal.signal(signal.SIGTERM, _terminated)
    try:
        return COMMANDS[args.command](args, connection_of(args))
    except ValueError as e:  # unreadable token file and the like
        eprint(f"mlx-cluster: {e}")
        return EXIT_USAGE
    except ClusterError as e:
        eprint(f"mlx-cluster: {e}")
        return EXIT_FAIL
    except KeyboardInterrupt:
        return 130  # (also after SIGTERM)


if __name__ == "__main__":
    sys.exit(main())
