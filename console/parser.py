"""The `mlx-cluster` command line: every command, its options and help text.

console/cli.py runs what this parser reads.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from console.client import ClusterError
from node.faults import KINDS as FAULT_KINDS
from node.membership import REJOIN_SETTLE_S
from node.plan import DEFAULT_STRATEGY, STRATEGIES, PlanError, backend_label, parse_backend

DISCOVER_S = 3.0  # seconds of zeroconf browsing when no nodes are named

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


def comma_list(text: str) -> list[str]:
    """An option's comma-separated values, blanks dropped."""
    return [part.strip() for part in text.split(",") if part.strip()]


def duration(text: str) -> float:
    """Seconds from 90, 90s, 20m or 1h."""
    units = {"s": 1, "m": 60, "h": 3600}
    scale = units.get(text[-1:].lower(), 1)
    try:
        value = float(text[:-1] if text[-1:].lower() in units else text) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration: write 90s, 20m or "
                                         "1h") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("a duration must be positive")
    return value


def int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ClusterError(f"{what} must be integers separated by commas, e.g. 1,2,4") from None
    if not values or min(values) < 1:
        raise ClusterError(f"{what} must be positive integers")
    return values


def backend_list(text: str) -> list[str]:
    try:
        return [backend_label(*parse_backend(b.strip())) for b in text.split(",") if b.strip()]
    except PlanError as e:
        raise ClusterError(str(e)) from e


def cpus_help(parser: argparse.ArgumentParser) -> None:
    """--cpus-per-node and --oversubscribe, for commands that start local nodes."""
    parser.add_argument("--cpus-per-node", type=int, default=0, metavar="K",
                        help="pin node i to its own K cores (mlx-node serve --cpus), so that "
                             "one many-core host stands in for N machines (default: unpinned)")
    parser.add_argument("--oversubscribe", action="store_true",
                        help="allow nodes x cores above this machine's cores (they then share)")


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
    nodes.add_argument("--token", help="cluster token (default: env MLX_CLUSTER_TOKEN, then the "
                                       "file `mlx-cluster token new` wrote)")
    nodes.add_argument("--token-file", type=Path, help="read the cluster token from a file")
    nodes.add_argument("--tls-ca", type=Path, help="CA certificate (PEM): talk TLS to the nodes")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    tok = sub.add_parser(
        "token", help="make or show the cluster token nodes and consoles share",
        description="One token guards every node of a cluster off loopback: `token new` "
                    "stores a strong one in your config dir, where `mlx-node serve` and "
                    "`mlx-cluster` read it by default; copy that file to the same place on "
                    "every machine (or pass --token-file). Loopback clusters need none.")
    tsub = tok.add_subparsers(dest="token_command", required=True)
    new = tsub.add_parser("new", help="make a token and store it (mode 600)")
    new.add_argument("--force", action="store_true", help="replace an existing token")
    new.add_argument("--file", type=Path, help="store it here instead of the config dir")
    tsub.add_parser("path", help="print where the token is stored")

    lp = sub.add_parser("local", help="start/stop a cluster of node processes on this machine")
    lsub = lp.add_subparsers(dest="local_command", required=True)
    up = lsub.add_parser("up", parents=[common], help="start N nodes on 127.0.0.1")
    up.add_argument("-n", type=int, default=3, help="number of nodes (default 3)")
    up.add_argument("--memory-budgets", help="per-node budgets, e.g. 4GiB,2GiB,2GiB")
    up.add_argument("--allow-faults", action="store_true", help="nodes accept fault injection")
    cpus_help(up)
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
    model_opts.add_argument("--strategy", default=DEFAULT_STRATEGY,
                            help="balanced (default) | memory | ring-memory-weighted | speed | "
                                 "uniform | manual:A-B,C-D,...")
    strategies = ("strategies: balanced (default: the split whose slowest stage is fastest, "
                  "counting each layer's and the output head's work and each node's "
                  "calibrated speed, within budgets), memory (largest remainder over memory "
                  "budgets, never above a budget), ring-memory-weighted (exo's, for "
                  "comparison), speed (by calibrated matmul speed, within budgets), uniform "
                  "(equal counts), manual:0-9,10-19,20-29 (node order)")
    sub.add_parser("models", parents=[common],
                   help="list the model specs: bundled, synthetic:<name> shapes, dirs, hub ids")
    sub.add_parser("plan", parents=[common, nodes, model_opts], epilog=strategies,
                   help="preview how a model would be split: layers and memory per node")
    load = sub.add_parser("load", parents=[common, nodes, model_opts], epilog=strategies,
                          help="split a model across the nodes (replaces the loaded plan)")
    load.add_argument("--auto-reform", action="store_true",
                      help="mlx-ring: when a rank's node dies, re-form the group on the "
                           "survivors (if the model still fits and splits)")
    load.add_argument("--no-auto-rejoin", action="store_true",
                      help="keep the plan's members as they are: by default a gRPC pipeline "
                           "loaded with a strategy takes in a node that restarts (same node "
                           "id) or joins (mlx-node serve --join), with a new epoch; a manual "
                           "split never does")
    load.add_argument("--rejoin-settle", type=float, default=REJOIN_SETTLE_S, metavar="S",
                      help="a node that joins or comes back is taken in once it has stayed up "
                           f"S seconds, so a flapping node does not make the plan thrash "
                           f"(default {REJOIN_SETTLE_S:.0f})")
    load.add_argument("--microbatches", type=int, default=0, metavar="K",
                      help="pipeline: K decode groups travel the ring at once, so that every "
                           "node computes one while the others are on their way (default: one "
                           "per node; 1: a single batch in lockstep)")

    sub.add_parser("unload", parents=[common, nodes], help="drop the loaded shards")
    sub.add_parser("rebalance", parents=[common, nodes],
                   help="re-plan the loaded model over every node up now and the plan's "
                        "members (re-admits nodes a recovery left out); exits 1, naming "
                        "them, when nodes it was told of do not answer")

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
               "'Authorization: Bearer <token>'. Off loopback (--host 0.0.0.0) it needs "
               "--api-key (or MLX_CLUSTER_API_KEY): clients send it as their api_key.")
    api.add_argument("--host", default="127.0.0.1", help="address to listen on")
    api.add_argument("--port", type=int, default=52415, help="port (exo's by default; 0 = any)")
    api.add_argument("--max-body-bytes", type=int, default=1024 * 1024,
                     help="requests with a larger body get 413")
    api.add_argument("--ready-file", type=Path, help="write {url, pid} here once listening")
    api.add_argument("--api-key", default=None,
                     help="key every /v1 request must send as 'Authorization: Bearer <key>' "
                          "(openai clients: api_key=...); /health stays open (default: env "
                          "MLX_CLUSTER_API_KEY)")
    api.add_argument("--insecure", action="store_true",
                     help="serve off loopback without an API key: anyone who reaches the "
                          "port can use the cluster")

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
    bench.add_argument("--strategy", default=DEFAULT_STRATEGY,
                       help=f"how layers are split ({', '.join(STRATEGIES)})")
    bench.add_argument("--backend", default="pipeline",
                       help="comma-separated backends to compare on the same nodes: "
                            "pipeline, mlx-ring:tensor, mlx-ring:pipeline")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--nodes-sweep", help="node counts, e.g. 1,2,3 (first N nodes, or "
                                             "local clusters with --local)")
    bench.add_argument("--local", action="store_true",
                       help="start and stop local clusters for each node count")
    cpus_help(bench)
    bench.add_argument("--microbatches", type=int, default=0, metavar="K",
                       help="pipeline: decode groups in flight (default: one per node; 1: "
                            "one batch in lockstep)")
    bench.add_argument("--scenario",
                       choices=["kill", "partition", "latency", "loss", "memory", "chaos"],
                       help="inject this fault into a node mid-run and record success, the "
                            "longest stall, recovery times and output correctness; chaos: a "
                            "soak of --duration with faults one after another (kill and "
                            "restart, latency, loss, partition) under streaming chat load "
                            "through the API, with --local (it restarts the nodes it kills)")
    bench.add_argument("--duration", type=duration, default=1200.0, metavar="TIME",
                       help="how long the chaos soak runs, e.g. 20m, 1h, 90s (default 20m)")
    bench.add_argument("--node", default="last", type=comma_list, metavar="POSITION",
                       help="where the faulty node sits in the plan: entry (the first shard, "
                            "where requests enter), middle or last (default); several, "
                            "comma-separated, run one after another (a kill: with --local)")
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
