"""`mlx-cluster`: one-shot commands for the cluster (the dashboard comes later).

Every command takes --json: data on stdout, diagnostics on stderr, non-zero exit on
failure. Nodes come from --nodes host:port,... or the cluster file `local up` wrote.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from console.client import ClusterError, NodeClient, entry_node, gather_infos, to_dict
from node.auth import read_token
from node.faults import KINDS as FAULT_KINDS
from node.plan import GIB
from protos import cluster_pb2 as pb

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2

EPILOG = """\
a first session:
  mlx-cluster local up -n 3                 # three nodes on 127.0.0.1
  mlx-cluster load --model smollm2-135m     # split the bundled model across them
  mlx-cluster generate --chat --prompt "What is the capital of France?"
  mlx-cluster status
  mlx-cluster local down

models: smollm2-135m, synthetic:<arch> (llama, qwen3, qwen3_moe, gemma3_text, ... and real
shapes such as synthetic:qwen3-8b; `mlx-cluster models` lists them), an MLX or HF model
directory of any mlx-lm architecture, or a hub id. Nodes: --nodes host:port,... or the
cluster file from `local up` (env MLX_CLUSTER names another one).
"""


def eprint(*args: Any) -> None:
    print(*args, file=sys.stderr, flush=True)


def emit(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=2) if args.json else text, flush=True)


def node_addresses(args: argparse.Namespace) -> list[str]:
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
    found = asyncio.run(discover(DISCOVER_S, client_options=CONNECTION))
    if not found:
        raise ClusterError("no nodes found: start some (`mlx-cluster local up -n 3`, or "
                           "`mlx-node serve` on each machine) or name them with --nodes "
                           "host:port,... or --peers-file FILE")
    return [i.address for i in found]


DISCOVER_S = 3.0


# connection options from the command line (--token, --token-file, --tls-ca), set by main()
CONNECTION: dict = {}


async def with_clients(addresses: list[str], fn):
    clients = [NodeClient(a, **CONNECTION) for a in addresses]
    try:
        return await fn(clients)
    finally:
        await asyncio.gather(*(c.close() for c in clients))


async def live_infos(clients: list[NodeClient]) -> list[pb.NodeInfo]:
    infos = await gather_infos(clients)
    errors = [str(i) for i in infos if isinstance(i, ClusterError)]
    if errors:
        raise ClusterError("; ".join(errors))
    return infos  # type: ignore[return-value]


# ---------------------------------------------------------------- local


def cmd_local(args: argparse.Namespace) -> int:
    from console import local

    if args.local_command == "up":
        budgets = args.memory_budgets.split(",") if args.memory_budgets else None
        node_args = ["--allow-faults"] if args.allow_faults else []
        if args.token_file:
            node_args += ["--token-file", str(args.token_file)]
        cluster = local.up(args.n, budgets, log=eprint if not args.json else lambda m: None,
                           node_args=node_args)
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


def cmd_status(args: argparse.Namespace) -> int:
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

    rows = asyncio.run(with_clients(node_addresses(args), run))
    lines = []
    for r in rows:
        if "error" in r:
            lines.append(f"{r['address']:22} DOWN  {r['error']}")
            continue
        caps, shard = r["capabilities"], r.get("shard") or {}
        mem = (f"mlx {r['mlx_active_bytes'] / GIB:5.2f} GiB (rss {r['rss_bytes'] / GIB:.2f}) / "
               f"budget {caps['memory_budget'] / GIB:5.2f} GiB")
        layers = (f"{shard['model']} {shard['start_layer']}-{shard['end_layer']} "
                  f"(epoch {shard['epoch']})") if shard else "no shard"
        ring = shard.get("ring")
        if ring:  # an mlx-ring rank: its worker's state (and why it is down)
            layers += (f" · mlx-ring:{ring['parallel']} rank {ring.get('rank', 0)}/"
                       f"{ring['size']} {ring['state']}"
                       + (f": {ring['error']}" if ring.get("error") else ""))
        faults = ", ".join(f"{f['spec']['kind']} ({f['id']})" for f in r.get("faults", []))
        lines.append(f"{r['address']:22} {'up' if r['up'] else 'unhealthy':5} {r['name'][:10]:10} "
                     f"{caps['mlx_device']}/{caps['blas']:9} {mem}  {layers}"
                     + (f"  faults: {faults}" if faults else ""))
    emit(args, {"nodes": rows}, "\n".join(lines))
    return EXIT_OK if all(r.get("up") for r in rows) else EXIT_FAIL


# ---------------------------------------------------------------- load / unload


def resolve_model(model: str, dtype: str, layers: int):
    """The model's source (config, form, dtype) as the nodes will see it."""
    from node.errors import ModelError
    from node.models import resolve

    try:
        return resolve(model, dtype, layers)
    except ModelError as e:
        raise ClusterError(str(e)) from e
    except (OSError, ValueError, KeyError) as e:  # unreadable or incomplete model files
        raise ClusterError(f"cannot read model {model!r}: {e}") from e


def partition(infos: list[pb.NodeInfo], model: str, dtype: str, layers: int, strategy: str,
              backend: str = "pipeline"):
    """Plan `model` over the nodes (in their order): a checked PartitionPlan and the source."""
    from node.errors import ModelError
    from node.models import shape_of, supports_tensor, tensor_refusal
    from node.plan import NodeSpec, PlanError, make_plan, make_tensor_plan, parse_backend

    source = resolve_model(model, dtype, layers)
    specs = [NodeSpec(i.node_id, i.capabilities.memory_budget, i.name, i.address,
                      i.capabilities.matmul_gflops) for i in infos]
    try:
        name, parallel = parse_backend(backend)
        if name == "mlx-ring" and parallel == "tensor":
            if not supports_tensor(source):
                raise PlanError(tensor_refusal(source))
            return make_tensor_plan(shape_of(source), source.config, specs, model=model), source
        return make_plan(strategy, shape_of(source), specs, model=model), source
    except (PlanError, ModelError) as e:
        raise ClusterError(str(e)) from e


def proto_plan(plan, model: str, epoch: int, backend: str = "pipeline",
               infos: list[pb.NodeInfo] = (), auto_reform: bool = False) -> pb.Plan:
    from node.plan import parse_backend

    name, parallel = parse_backend(backend)
    ports = {i.node_id: i.ring_port for i in infos}
    return pb.Plan(model=model, epoch=epoch, n_layers=plan.n_layers, strategy=plan.strategy,
                   context_length=plan.context, backend=name, parallel=parallel,
                   auto_reform=auto_reform and name == "mlx-ring",
                   shards=[pb.PlanShard(node_id=s.node.node_id, address=s.node.address,
                                        name=s.node.name, start_layer=s.start, end_layer=s.end,
                                        param_bytes=s.param_bytes, kv_bytes=s.kv_bytes,
                                        ring_port=ports.get(s.node.node_id, 0)
                                        if name == "mlx-ring" else 0)
                           for s in plan.shards])


async def load_plan(clients: list[NodeClient], model: str, dtype: str, layers: int,
                    strategy: str, progress=eprint, backend: str = "pipeline",
                    auto_reform: bool = False) -> tuple[pb.Plan, list[pb.ShardInfo]]:
    """Plan `model` over the nodes and load every shard at once. For mlx-ring the node
    services start one worker each and the loads return once the group has formed."""
    infos = await live_infos(clients)
    plan, _ = partition(infos, model, dtype, layers, strategy, backend)
    epoch = max((i.shard.epoch for i in infos if i.HasField("shard")), default=0) + 1
    proto = proto_plan(plan, model, epoch, backend, infos, auto_reform)
    progress(f"loading {model} ({plan.n_layers} layers, {backend}, {plan.strategy}) on "
             f"{len(clients)} node(s), epoch {epoch}")
    options = pb.ModelOptions(dtype=dtype, layers=layers)
    client_of = {i.node_id: c for c, i in zip(clients, infos)}
    t0 = time.perf_counter()

    async def one(shard: pb.PlanShard) -> pb.ShardInfo:
        reply = await client_of[shard.node_id].load(proto, options)
        part = (f"rank {reply.shard.ring.rank}/{reply.shard.ring.size} "
                f"({reply.shard.ring.parallel})" if reply.shard.HasField("ring")
                else f"layers {shard.start_layer}-{shard.end_layer}")
        progress(f"  {shard.address}: {part} loaded "
                 f"({reply.shard.weight_bytes / 2**20:.0f} MiB, {reply.shard.form}) "
                 f"after {time.perf_counter() - t0:.1f} s")
        return reply.shard

    results = await asyncio.gather(*(one(s) for s in proto.shards), return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        raise ClusterError("load failed: " + "; ".join(str(e) for e in errors))
    return proto, results  # type: ignore[return-value]


def plan_rows(plan: pb.Plan) -> list[dict]:
    from node.plan import layer_bar

    return [{"node": s.node_id, "name": s.name, "address": s.address,
             "start_layer": s.start_layer, "end_layer": s.end_layer,
             "layers": s.end_layer - s.start_layer + 1,
             "bar": layer_bar(s.start_layer, s.end_layer, plan.n_layers),
             "param_bytes": s.param_bytes, "kv_bytes": s.kv_bytes,
             "total_bytes": s.param_bytes + s.kv_bytes} for s in plan.shards]


def format_plan(plan: pb.Plan, budgets: dict[str, int], dtype: str) -> str:
    from node.plan import backend_label

    split = (f" · every layer split {len(plan.shards)} ways"
             if plan.backend == "mlx-ring" and plan.parallel == "tensor" else "")
    lines = [f"{plan.model} · {plan.n_layers} layers · {dtype} · "
             f"{backend_label(plan.backend, plan.parallel)}{split} · strategy {plan.strategy} · "
             f"KV cache at {plan.context_length} tokens",
             f"{'NODE':12} {'ADDRESS':21} {'LAYERS':>7}  {'LAYER MAP':30}  "
             f"{'WEIGHTS':>9} {'KV':>9} {'TOTAL':>9} {'BUDGET':>9}"]
    for r in plan_rows(plan):
        lines.append(f"{r['name'][:12]:12} {r['address']:21} "
                     f"{r['start_layer']:>3}-{r['end_layer']:<3}  {r['bar']:30}  "
                     f"{r['param_bytes'] / GIB:5.2f} GiB {r['kv_bytes'] / GIB:5.2f} GiB "
                     f"{r['total_bytes'] / GIB:5.2f} GiB {budgets[r['node']] / GIB:5.2f} GiB")
    return "\n".join(lines)


def cmd_plan(args: argparse.Namespace) -> int:
    infos = asyncio.run(with_clients(node_addresses(args), live_infos))
    plan, source = partition(infos, args.model, args.dtype, args.layers, args.strategy,
                             args.backend)
    proto = proto_plan(plan, args.model, 0, args.backend, infos)
    budgets = {i.node_id: i.capabilities.memory_budget for i in infos}
    dtype = source.dtype or source.form
    emit(args, {"model": args.model, "strategy": plan.strategy, "n_layers": plan.n_layers,
                "context_length": plan.context, "dtype": dtype,
                "shards": [dict(r, budget_bytes=budgets[r["node"]]) for r in plan_rows(proto)]},
         format_plan(proto, budgets, dtype))
    return EXIT_OK


def cmd_load(args: argparse.Namespace) -> int:
    async def run(clients):
        return await load_plan(clients, args.model, args.dtype, args.layers, args.strategy,
                               progress=eprint, backend=args.backend,
                               auto_reform=args.auto_reform)

    plan, shards = asyncio.run(with_clients(node_addresses(args), run))
    data = {"plan": to_dict(plan), "shards": [to_dict(s) for s in shards]}
    text = "\n".join(f"{p.address:22} layers {p.start_layer:>3}-{p.end_layer:<3} "
                     f"{s.weight_bytes / 2**20:8.1f} MiB  {s.form}"
                     for p, s in zip(plan.shards, shards))
    emit(args, data, f"{plan.model} epoch {plan.epoch}\n{text}")
    return EXIT_OK


def cmd_rebalance(args: argparse.Namespace) -> int:
    from node.models import SYNTHETIC_PREFIX

    async def run(clients):
        infos = await gather_infos(clients)
        live = [(c, i) for c, i in zip(clients, infos) if not isinstance(i, ClusterError)]
        if not live:
            raise ClusterError("no node is up")
        loaded = [i for _, i in live if i.HasField("plan")]
        if not loaded:
            raise ClusterError("nothing is loaded; use mlx-cluster load --model SPEC")
        plan = max((i.plan for i in loaded), key=lambda p: p.epoch)
        layers = plan.n_layers if plan.model.startswith(SYNTHETIC_PREFIX) else 0
        strategy = plan.strategy or "memory"
        from node.plan import backend_label

        return await load_plan([c for c, _ in live], plan.model, "", layers, strategy,
                               backend=backend_label(plan.backend, plan.parallel),
                               auto_reform=plan.auto_reform)

    plan, shards = asyncio.run(with_clients(node_addresses(args), run))
    emit(args, {"plan": to_dict(plan)},
         f"{plan.model} epoch {plan.epoch} over {len(plan.shards)} node(s): " + ", ".join(
             f"{s.name or s.address} {s.start_layer}-{s.end_layer}" for s in plan.shards))
    return EXIT_OK


def cmd_unload(args: argparse.Namespace) -> int:
    async def run(clients):
        return await asyncio.gather(*(c.unload() for c in clients))

    addresses = node_addresses(args)
    done = asyncio.run(with_clients(addresses, run))
    emit(args, {"unloaded": [a for a, d in zip(addresses, done) if d]},
         f"unloaded {sum(done)} shard(s)")
    return EXIT_OK


# ---------------------------------------------------------------- generate


async def generate(clients: list[NodeClient], request: pb.GenerateRequest,
                   on_text=lambda text: None) -> dict:
    """Send a request to the entry shard; returns the --json result. Nodes that are down
    are left out (after a recovery the plan no longer needs them)."""
    infos = await gather_infos(clients)
    up = [(c, i) for c, i in zip(clients, infos) if not isinstance(i, ClusterError)]
    if not up:
        raise ClusterError("; ".join(str(i) for i in infos))
    clients, infos = [c for c, _ in up], [i for _, i in up]
    entry = entry_node(infos)
    client = next(c for c, i in zip(clients, infos) if i.node_id == entry.node_id)
    ids, parts, logprobs, done = [], [], [], None
    async for event in client.generate(request):
        if event.HasField("token"):
            ids.append(event.token.token_id)
            if event.token.HasField("logprob"):
                logprobs.append(event.token.logprob)
            parts.append(event.token.text)
            on_text(event.token.text)
        else:
            done = event.done
            parts.append(done.tail_text)
            on_text(done.tail_text)
    if done is None:
        raise ClusterError(f"the stream from {client.address} ended without a result")
    return {
        "text": "".join(parts), "token_ids": ids,
        **({"logprobs": logprobs} if len(logprobs) == len(ids) and ids else {}),
        "tokens_per_s": done.decode_tokens_per_s, "ttft_s": done.ttft_s,
        "total_s": done.total_s, "finish_reason": done.finish_reason,
        "prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
        "epoch": done.epoch, "model": entry.plan.model,
        "shards": [{"node": s.node_id, "address": s.address, "start_layer": s.start_layer,
                    "end_layer": s.end_layer} for s in entry.plan.shards],
    }


def generate_request(args: argparse.Namespace) -> pb.GenerateRequest:
    sampling = pb.SamplingParams(temperature=args.temperature, top_p=args.top_p)
    if args.seed is not None:
        sampling.seed = args.seed
    return pb.GenerateRequest(prompt=args.prompt, chat=args.chat, max_tokens=args.max_tokens,
                              sampling=sampling, ignore_eos=args.ignore_eos)


def cmd_generate(args: argparse.Namespace) -> int:
    def show(text: str) -> None:
        if not args.json:
            print(text, end="", flush=True)

    result = asyncio.run(with_clients(node_addresses(args),
                                      lambda cl: generate(cl, generate_request(args), show)))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print()
        eprint(f"[{result['completion_tokens']} tokens, {result['finish_reason']}; "
               f"TTFT {result['ttft_s'] * 1000:.0f} ms, {result['tokens_per_s']:.1f} tok/s "
               f"over {len(result['shards'])} shard(s)]")
    return EXIT_OK


# ---------------------------------------------------------------- demo


def cmd_demo(args: argparse.Namespace) -> int:
    """Start a 3-node local cluster, load the bundled model, stream answers, then open the
    dashboard (in a terminal; without one, stop after the answers)."""
    from console import local

    cluster = local.read_cluster()
    if not cluster or not local.live_nodes(cluster):
        eprint("starting a 3-node local cluster on 127.0.0.1 ...")
        local.up(3, log=eprint)
    addresses = node_addresses(args)

    async def run(clients):
        await load_plan(clients, "smollm2-135m", "", 0, "memory")
        for question in DEMO_PROMPTS:
            print(f"\n> {question}\n", flush=True)
            request = pb.GenerateRequest(prompt=question, chat=True, max_tokens=48)
            result = await generate(clients, request, lambda t: print(t, end="", flush=True))
            eprint(f"\n[{result['completion_tokens']} tokens, TTFT {result['ttft_s'] * 1000:.0f} "
                   f"ms, {result['tokens_per_s']:.1f} tok/s across "
                   f"{len(result['shards'])} nodes]")

    asyncio.run(with_clients(addresses, run))
    if sys.stdin.isatty() and sys.stdout.isatty():
        eprint("\nopening the dashboard (q quits; the cluster keeps running) ...")
        time.sleep(1.5)
        from console.tui.app import run_dashboard

        run_dashboard(addresses, False, CONNECTION)
    eprint("\nthe cluster is still running; try:\n"
           "  .venv/bin/mlx-cluster                  # the dashboard\n"
           "  .venv/bin/mlx-cluster generate --chat --prompt 'Name three planets.'\n"
           "  .venv/bin/mlx-cluster status\n"
           "  .venv/bin/mlx-cluster local down       # stop it")
    return EXIT_OK


DEMO_PROMPTS = ("What is the capital of France?", "What is the boiling point of water in Celsius?")


# ---------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlx-cluster", description="Console for an MLX inference cluster.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    nodes = argparse.ArgumentParser(add_help=False)
    nodes.add_argument("--nodes", help="comma-separated host:port list (default: the cluster file)")
    nodes.add_argument("--peers-file", type=Path, dest="peers_file",
                       help='TOML peers file: one [[node]] table per node, address = "host:port"')
    nodes.add_argument("--token", help="cluster token (default: env MLX_CLUSTER_TOKEN)")
    nodes.add_argument("--token-file", type=Path, help="read the cluster token from a file")
    nodes.add_argument("--tls-ca", type=Path, help="CA certificate (PEM): talk TLS to the nodes")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    lp = sub.add_parser("local", help="start/stop a cluster of node processes on this machine")
    lsub = lp.add_subparsers(dest="local_command", required=True)
    up = lsub.add_parser("up", parents=[common], help="start N nodes on 127.0.0.1")
    up.add_argument("-n", type=int, default=3, help="number of nodes (default 3)")
    up.add_argument("--memory-budgets", help="per-node budgets, e.g. 4GiB,2GiB,2GiB")
    up.add_argument("--allow-faults", action="store_true", help="nodes accept fault injection")
    up.add_argument("--token-file", type=Path,
                    help="nodes require this cluster token (env MLX_CLUSTER_TOKEN works too)")
    lsub.add_parser("down", parents=[common], help="stop the nodes `local up` started")
    lsub.add_parser("status", parents=[common], help="list the local nodes and whether they run")

    disc = sub.add_parser("discover", parents=[common, nodes],
                          help="find nodes with zeroconf (plus --nodes/--peers-file) and list them")
    disc.add_argument("--timeout", type=float, default=DISCOVER_S,
                      help=f"seconds to browse (default {DISCOVER_S:.0f})")
    disc.add_argument("--interface", action="append", default=[], metavar="IP",
                      help="browse on this interface address only (repeatable)")
    disc.add_argument("--no-mdns", action="store_true", help="only --nodes / --peers-file")
    sub.add_parser("status", parents=[common, nodes],
                   help="health, capabilities and loaded shard of every node")

    model_opts = argparse.ArgumentParser(add_help=False)
    model_opts.add_argument("--model", required=True,
                            help="smollm2-135m, synthetic:<name> (see `mlx-cluster models`), "
                                 "an MLX or HF model directory, or a hub id")
    model_opts.add_argument("--layers", type=int, default=0,
                            help="layer count override (synthetic models)")
    model_opts.add_argument("--dtype", default="", choices=["", "float32", "float16", "bfloat16"],
                            help="compute dtype (default: float32 on CPU, float16 on GPU)")
    model_opts.add_argument("--backend", default="pipeline",
                            help="pipeline (gRPC, survives node loss; default) | "
                                 "mlx-ring:tensor | mlx-ring:pipeline (MLX's own ring group, "
                                 "started by the node services)")
    model_opts.add_argument("--strategy", default="memory",
                            help="memory (default) | ring-memory-weighted | speed | uniform | "
                                 "manual:A-B,C-D,...")
    strategies = ("strategies: memory (largest remainder over memory budgets, never above a "
                  "budget), ring-memory-weighted (exo's, for comparison), speed (by calibrated "
                  "matmul speed, within budgets), uniform (equal counts), manual:0-9,10-19,20-29 "
                  "(node order)")
    sub.add_parser("models", parents=[common],
                   help="list the model specs: bundled, synthetic:<name> shapes, dirs, hub ids")
    sub.add_parser("plan", parents=[common, nodes, model_opts], epilog=strategies,
                   help="preview how a model would be split: layers and memory per node")
    load = sub.add_parser("load", parents=[common, nodes, model_opts], epilog=strategies,
                          help="split a model across the nodes (replaces the loaded plan)")
    load.add_argument("--auto-reform", action="store_true",
                      help="mlx-ring: when a rank's node dies, re-form the group on the "
                           "survivors (if the model still fits and splits)")

    sub.add_parser("unload", parents=[common, nodes], help="drop the loaded shards")
    sub.add_parser("rebalance", parents=[common, nodes],
                   help="re-plan the loaded model over every node up now (re-admits nodes "
                        "that came back after a recovery)")

    gen = sub.add_parser("generate", parents=[common, nodes], help="stream tokens for a prompt")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-p", type=float, default=0.0, help="nucleus sampling (0 = off)")
    gen.add_argument("--seed", type=int, default=None, help="seed for sampled generation")
    gen.add_argument("--chat", action="store_true", help="apply the model's chat template")
    gen.add_argument("--ignore-eos", action="store_true", help="keep generating past EOS")

    inj = sub.add_parser("inject", parents=[common, nodes],
                         help="inject a fault into a node started with --allow-faults",
                         epilog="faults: kill, hang, latency --ms M [--jitter J], loss --p P, "
                                "slow-compute --factor F, bandwidth --kbps K, partition --peers "
                                "A,B [--direction to|from|both], memory-pressure --gib G; each "
                                "with --duration S and --seed N")
    inj.add_argument("node", help="node name, id or host:port")
    inj.add_argument("fault", choices=FAULT_KINDS)
    inj.add_argument("--ms", type=float, default=0.0, help="latency: delay per frame (ms)")
    inj.add_argument("--jitter", type=float, default=0.0, help="latency: +- jitter (ms)")
    inj.add_argument("--p", type=float, default=0.0, help="loss: drop probability")
    inj.add_argument("--factor", type=float, default=0.0, help="slow-compute: slow-down factor")
    inj.add_argument("--kbps", type=float, default=0.0, help="bandwidth: kbit/s")
    inj.add_argument("--peers", default="", help="partition: node names, ids or addresses")
    inj.add_argument("--direction", default="both", choices=["both", "to", "from"])
    inj.add_argument("--gib", type=float, default=0.0, help="memory-pressure: GiB to hold")
    inj.add_argument("--duration", type=float, default=0.0, help="seconds until it heals (0 = "
                                                                    "until `heal`)")
    inj.add_argument("--seed", type=int, default=None)
    heal = sub.add_parser("heal", parents=[common, nodes], help="remove injected faults")
    heal.add_argument("node", nargs="?", help="node name, id or host:port (default: --all)")
    heal.add_argument("--all", action="store_true", help="heal every node")
    stop = sub.add_parser("shutdown", parents=[common, nodes], help="stop node processes")
    stop.add_argument("node", nargs="*", help="node names, ids or host:port")
    stop.add_argument("--all", action="store_true", help="stop every node")

    api = sub.add_parser(
        "serve-api", parents=[nodes], help="an OpenAI-compatible HTTP API over the loaded plan",
        epilog="example: mlx-cluster serve-api --port 52415, then point any OpenAI client at "
               "http://127.0.0.1:52415/v1 (the model name is the loaded spec, e.g. "
               "smollm2-135m). With --token, POST /v1/models/load needs "
               "'Authorization: Bearer <token>'.")
    api.add_argument("--host", default="127.0.0.1", help="address to listen on")
    api.add_argument("--port", type=int, default=52415, help="port (exo's by default; 0 = any)")
    api.add_argument("--max-body-bytes", type=int, default=1024 * 1024,
                     help="requests with a larger body get 413")
    api.add_argument("--ready-file", type=Path, help="write {url, pid} here once listening")

    bench = sub.add_parser(
        "bench", parents=[common, nodes], help="benchmark the cluster; results to JSON",
        epilog="example: mlx-cluster bench --local --nodes-sweep 1,2,3 --model smollm2-135m "
               "--prompt-tokens 64 --gen-tokens 32 --concurrency 1,4 --out r.json")
    bench.add_argument("--model", default="smollm2-135m")
    bench.add_argument("--prompt-tokens", type=int, default=64, help="exact prompt length")
    bench.add_argument("--gen-tokens", type=int, default=32, help="tokens per request (EOS "
                                                                   "banned)")
    bench.add_argument("--requests", type=int, default=8, help="requests per run")
    bench.add_argument("--concurrency", default="1", help="sweep, e.g. 1,2,4,8")
    bench.add_argument("--warmup", type=int, default=1)
    bench.add_argument("--repeats", type=int, default=1)
    bench.add_argument("--strategy", default="memory")
    bench.add_argument("--backend", default="pipeline",
                       help="comma-separated backends to compare on the same nodes: "
                            "pipeline, mlx-ring:tensor, mlx-ring:pipeline")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--nodes-sweep", help="node counts, e.g. 1,2,3 (first N nodes, or "
                                             "local clusters with --local)")
    bench.add_argument("--local", action="store_true",
                       help="start and stop local clusters for each node count")
    bench.add_argument("--scenario", choices=["kill", "partition", "latency", "loss", "memory"],
                       help="inject this fault into a non-entry node mid-run and record "
                            "success, recovery times and output correctness")
    bench.add_argument("--fault-at", type=float, default=0.3,
                       help="inject once this fraction of the requests is done")
    bench.add_argument("--out", type=Path, default=Path("bench-results.json"))
    rep = sub.add_parser("report", parents=[common],
                         help="write a Markdown comparison report from bench results")
    rep.add_argument("results", nargs="+", type=Path)
    rep.add_argument("-o", "--output", type=Path, default=Path("report.md"))

    dash = sub.add_parser("dashboard", parents=[nodes],
                          help="the live dashboard (also what a bare `mlx-cluster` opens)")
    dash.add_argument("--mdns", action="store_true",
                      help="also browse zeroconf when nodes are named")
    dash.add_argument("--interface", action="append", default=[], metavar="IP",
                      help="zeroconf on this interface address only (repeatable)")

    sub.add_parser("demo", parents=[nodes],
                   help="start a 3-node local cluster, load the bundled model, generate")
    return parser


async def pick_nodes(clients: list[NodeClient], wanted: list[str]) -> list[NodeClient]:
    """The clients whose node name, id or address is in `wanted` (all when empty)."""
    if not wanted:
        return clients
    infos = await gather_infos(clients)
    chosen = []
    for want in wanted:
        match = [c for c, i in zip(clients, infos) if want == c.address or (
            not isinstance(i, ClusterError) and want in (i.name, i.node_id))]
        if not match and ":" in want:
            match = [NodeClient(want, **CONNECTION)]
        if not match:
            known = ", ".join(i.name for i in infos if not isinstance(i, ClusterError))
            raise ClusterError(f"no node named {want!r} (known: {known})")
        chosen += match
    return chosen


def fault_rows(active) -> list[dict]:
    return [{"id": f.id, "kind": f.spec.kind, "remaining_s": f.remaining_s,
             "spec": to_dict(f.spec)} for f in active]


def cmd_inject(args: argparse.Namespace) -> int:
    spec = pb.FaultSpec(kind=args.fault, ms=args.ms, jitter_ms=args.jitter, p=args.p,
                        factor=args.factor, duration_s=args.duration, kbps=args.kbps,
                        direction=args.direction, gib=args.gib)
    if args.seed is not None:
        spec.seed = args.seed

    async def run(clients):
        (client,) = await pick_nodes(clients, [args.node])
        if args.peers:  # partitions match node ids and addresses: name both
            for peer in await pick_nodes(clients, args.peers.split(",")):
                info = await peer.info()
                spec.peers.extend([info.node_id, peer.address])
        return client.address, await client.inject(spec)

    address, reply = asyncio.run(with_clients(node_addresses(args), run))
    rows = fault_rows(reply.active)
    emit(args, {"node": address, "active": rows},
         f"{address}: {args.fault} injected; active: "
         + ", ".join(f"{r['kind']} ({r['id']})" for r in rows))
    return EXIT_OK


def cmd_heal(args: argparse.Namespace) -> int:
    if not args.node and not args.all:
        args.all = True

    async def run(clients):
        chosen = await pick_nodes(clients, [] if args.all else [args.node])
        replies = await asyncio.gather(*(c.heal() for c in chosen), return_exceptions=True)
        return [(c.address, r) for c, r in zip(chosen, replies)]

    results = asyncio.run(with_clients(node_addresses(args), run))
    data = [{"node": a, "error": str(r)} if isinstance(r, BaseException)
            else {"node": a, "active": fault_rows(r.active)} for a, r in results]
    emit(args, {"nodes": data}, "\n".join(
        f"{d['node']}: {d.get('error', 'healed')}" for d in data))
    return EXIT_FAIL if any("error" in d for d in data) else EXIT_OK


def cmd_shutdown(args: argparse.Namespace) -> int:
    if not args.node and not args.all:
        raise ClusterError("name the nodes to stop, or pass --all")

    async def run(clients):
        chosen = await pick_nodes(clients, [] if args.all else args.node)
        done = await asyncio.gather(*(c.shutdown("mlx-cluster shutdown") for c in chosen))
        return [c.address for c, ok in zip(chosen, done) if ok]

    stopped = asyncio.run(with_clients(node_addresses(args), run))
    emit(args, {"stopping": stopped}, f"stopping {len(stopped)} node(s): {', '.join(stopped)}")
    return EXIT_OK


def cmd_models(args: argparse.Namespace) -> int:
    from node.models import spec_lines

    lines = spec_lines()
    width = max(len(spec) for spec, _ in lines)
    emit(args, [{"spec": spec, "description": what} for spec, what in lines],
         "\n".join(f"{spec:<{width}}  {what}" for spec, what in lines)
         + "\n\nany mlx-lm architecture whose layers keep a key/value cache can be split; "
           "--layers N shortens a synthetic model")
    return EXIT_OK


def cmd_discover(args: argparse.Namespace) -> int:
    from console.discovery import discover, read_peers_file

    static = [a.strip() for a in (args.nodes or "").split(",") if a.strip()]
    if args.peers_file:
        static += read_peers_file(args.peers_file)
    found = asyncio.run(discover(args.timeout, static, not args.no_mdns,
                                 args.interface or None, CONNECTION))
    rows = [to_dict(i) for i in found]
    text = "\n".join(
        f"{i.name[:16]:16} {i.address:22} id {i.node_id}  {i.capabilities.mlx_device}/"
        f"{i.capabilities.blas}  budget {i.capabilities.memory_budget / GIB:.1f} GiB"
        + (f"  {i.shard.model} {i.shard.start_layer}-{i.shard.end_layer}"
           if i.HasField("shard") else "") for i in found)
    emit(args, {"nodes": rows}, text or f"no nodes found in {args.timeout:.0f} s")
    return EXIT_OK if found else EXIT_FAIL


def int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ClusterError(f"{what} must be integers separated by commas, e.g. 1,2,4") from None
    if not values or min(values) < 1:
        raise ClusterError(f"{what} must be positive integers")
    return values


def backend_list(text: str) -> list[str]:
    from node.plan import PlanError, backend_label, parse_backend

    try:
        return [backend_label(*parse_backend(b.strip())) for b in text.split(",") if b.strip()]
    except PlanError as e:
        raise ClusterError(str(e)) from e


def cmd_bench(args: argparse.Namespace) -> int:
    from console.bench import Workload, run_bench

    if not 0 < args.fault_at < 1:
        raise ClusterError("--fault-at is a fraction of the requests, between 0 and 1")
    work = Workload(model=args.model, prompt_tokens=args.prompt_tokens,
                    gen_tokens=args.gen_tokens, requests=args.requests,
                    concurrency=int_list(args.concurrency, "--concurrency"),
                    warmup=args.warmup, repeats=args.repeats, strategy=args.strategy,
                    seed=args.seed, backends=backend_list(args.backend))
    sweep = int_list(args.nodes_sweep, "--nodes-sweep") if args.nodes_sweep else None
    addresses = None if args.local else node_addresses(args)
    doc = run_bench(work, addresses, sweep, args.local, CONNECTION, args.scenario or "",
                    args.fault_at)
    args.out.write_text(json.dumps(doc, indent=1))
    def secs(x) -> str:
        return "—" if x is None else f"{x:.2f} s"

    rows = [f"{c['backend']} {c['nodes']} node(s) c={r['concurrency']}: "
            f"{r['aggregate_tokens_per_s']:.1f} "
            f"tok/s aggregate, {r['single_stream_tokens_per_s']:.1f} single-stream, TTFT p50 "
            f"{r['ttft_s']['p50'] * 1000:.0f} ms, success {r['success_rate']:.1%}"
            for c in doc["configurations"] for r in c["runs"]]
    rows += [f"{s['backend']} {s['fault']} on {s['node']}: success {s['success_rate']:.2%}, "
             f"outputs correct {s['outputs_correct']}, detect {secs(s['detect_s'])}, "
             f"recovered {secs(s['recover_s'])}, longest stall {secs(s['stall_s'])}"
             + (f" ({s['recovery_error']})" if s.get("recovery_error") else "")
             for s in doc["scenarios"]]
    emit(args, doc, "\n".join(rows) + f"\nresults: {args.out}")
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
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


def cmd_dashboard(args: argparse.Namespace) -> int:
    from console.tui.app import run_dashboard

    static, mdns = dashboard_sources(args)
    return run_dashboard(static, mdns, CONNECTION, args.interface or None)


def cmd_serve_api(args: argparse.Namespace) -> int:
    from console.gateway import serve

    addresses = node_addresses(args)

    def ready(url: str) -> None:
        eprint(f"OpenAI-compatible API on {url}/v1 for {len(addresses)} node(s) "
               f"(POST /v1/chat/completions, /v1/completions; GET /v1/models, /health, "
               f"/v1/cluster); Ctrl-C stops it")
        if args.ready_file:
            args.ready_file.write_text(json.dumps({"url": url, "pid": os.getpid()}))

    # the gateway guards its mutating endpoint with the same token the nodes use, wherever
    # it came from (--token, --token-file or MLX_CLUSTER_TOKEN)
    serve(addresses, args.host, args.port, read_token(args.token, args.token_file),
          CONNECTION, args.max_body_bytes, ready)
    return EXIT_OK


COMMANDS = {"local": cmd_local, "discover": cmd_discover, "dashboard": cmd_dashboard,
            "serve-api": cmd_serve_api,
            "bench": cmd_bench, "report": cmd_report,
            "status": cmd_status, "plan": cmd_plan, "load": cmd_load, "unload": cmd_unload,
            "rebalance": cmd_rebalance, "models": cmd_models,
            "generate": cmd_generate, "inject": cmd_inject,
            "heal": cmd_heal, "shutdown": cmd_shutdown, "demo": cmd_demo}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        if not sys.stdout.isatty():
            parser.print_help()
            return EXIT_OK
        args = parser.parse_args(["dashboard"])
    try:
        CONNECTION.clear()
        if getattr(args, "token", None) or getattr(args, "token_file", None):
            CONNECTION["token"] = read_token(args.token, args.token_file)
        if getattr(args, "tls_ca", None):
            CONNECTION["tls_ca"] = args.tls_ca
        return COMMANDS[args.command](args)
    except ValueError as e:  # unreadable token file and the like
        eprint(f"mlx-cluster: {e}")
        return EXIT_USAGE
    except ClusterError as e:
        eprint(f"mlx-cluster: {e}")
        return EXIT_FAIL
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
