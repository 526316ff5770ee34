"""Benchmark: do the first requests after a load wait for what MLX compiles on first use?

On a GPU, MLX compiles kernels the first time a process meets a shape (a batch size), and
the request that brings it waits. A node therefore runs the batch sizes it serves once at
load (`mlx-node serve --warmup-batches`, node/warmup.py). This script shows what
that buys, in one run:

- it starts a local cluster of `--nodes` nodes twice, once with `--warmup-batches none`
  and once with `--warmup-batches` as given (default `auto`: 1-8,16,32,64 on a GPU, none
  on a CPU); each cluster gets its own empty MLX_PTX_CACHE_DIR, MLX's on-disk cache of
  compiled GPU kernels, which would otherwise let the second cluster reuse the first's;
- it loads the model (uniform plan) and prints how long each load took;
- at each concurrency of `--levels` it sends that many requests at once (seeded prompts of
  `--prompt-tokens` ids, `--tokens` tokens each, EOS ignored), then the same again: the
  first round is the first time the nodes see that batch size, the second is warm;
- it prints, per level and round, time to first token (p50 and max) and the longest gap
  between two tokens of any request.

    .venv/bin/python tests/bench/first_use.py [--model smollm2-135m] [--levels 1,2,4,8]
    .venv/bin/python tests/bench/first_use.py --model synthetic:llama-7b --dtype float16
    .venv/bin/python tests/bench/first_use.py --only-warmed      # the warmed cluster alone
    .venv/bin/python tests/bench/first_use.py --warmup 1-8       # on a CPU, where auto is none
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from console import local, ops  # noqa: E402
from console.workload import Route, percentiles, run_level, workload_prompts  # noqa: E402
from tests.bench.common import add_model_arguments  # noqa: E402


async def measure(addresses: list[str], args, prompts: list[list[int]]) -> dict:
    async with ops.connect(addresses) as clients:
        t0 = time.perf_counter()
        _, infos = await ops.load_plan(clients, args.model, args.dtype, args.layers,
                                       "uniform", progress=lambda m: None)
        load_s = time.perf_counter() - t0
        route = Route(clients)
        out: dict = {"load_s": load_s,
                     "shard_load_s": [round(i.load_seconds, 3) for i in infos], "levels": {}}
        used = 0
        for c in args.levels:
            for label in ("first", "again"):
                batch = prompts[used:used + c]
                used += c
                results, wall = await run_level(route, batch, args.tokens, c, 600.0,
                                                lambda done, total: None)
                ok = [r for r in results if r.ok]
                if len(ok) < len(results):
                    errors = {r.error for r in results if not r.ok}
                    raise SystemExit(f"{len(results) - len(ok)} request(s) failed: {errors}")
                ttft = percentiles([r.ttft_s for r in ok])
                gap = max(r.max_gap_s for r in ok)
                out["levels"].setdefault(str(c), {})[label] = {
                    "ttft_p50_s": ttft["p50"], "ttft_max_s": ttft["max"], "max_gap_s": gap,
                    "wall_s": wall, "tok_s": sum(r.tokens for r in ok) / wall}
                print(f"  concurrency {c:>2} {label:<5}: TTFT p50 {ttft['p50'] * 1e3:8.1f} ms"
                      f"  max {ttft['max'] * 1e3:8.1f} ms   longest gap "
                      f"{gap * 1e3:8.1f} ms", flush=True)
    return out


def run_cluster(args, warmup: str, prompts: list[list[int]], tmp: Path) -> dict:
    cache = tmp / f"ptx-{warmup}"
    cache.mkdir()
    saved = os.environ.get("MLX_PTX_CACHE_DIR")
    os.environ["MLX_PTX_CACHE_DIR"] = str(cache)  # the nodes inherit it
    path = tmp / f"cluster-{warmup}.json"
    try:
        cluster = local.up(args.nodes, path=path, timeout_s=180.0,
                           node_args=["--no-advertise", "--warmup-batches", warmup])
        try:
            return asyncio.run(measure([n["address"] for n in cluster["nodes"]], args,
                                       prompts))
        finally:
            local.down(path)
    finally:
        if saved is None:
            os.environ.pop("MLX_PTX_CACHE_DIR", None)
        else:
            os.environ["MLX_PTX_CACHE_DIR"] = saved


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--levels", default="1,2,4,8", help="concurrency levels, in order")
    parser.add_argument("--tokens", type=int, default=16, help="tokens per request")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--warmup", default="auto",
                        help="--warmup-batches of the warmed cluster (default auto)")
    parser.add_argument("--only-warmed", action="store_true",
                        help="skip the cluster without warm-up (its first requests can wait "
                             "for minutes of kernel compiles on a GPU)")
    parser.add_argument("--json", type=Path, help="write the numbers here")
    args = parser.parse_args()
    args.levels = [int(x) for x in args.levels.split(",")]
    prompts = workload_prompts(args.model, 2 * sum(args.levels), args.prompt_tokens, seed=7)
    print(f"model {args.model}{f' ({args.layers} layers)' if args.layers else ''}"
          f"{f' {args.dtype}' if args.dtype else ''}, {args.nodes} node(s), prompts of "
          f"{args.prompt_tokens} tokens, {args.tokens} tokens each, levels {args.levels}",
          flush=True)
    got = {}
    with tempfile.TemporaryDirectory() as tmp:
        for warmup in ([] if args.only_warmed else ["none"]) + [args.warmup]:
            print(f"--warmup-batches {warmup}:", flush=True)
            got[warmup] = run_cluster(args, warmup, prompts, Path(tmp))
            print(f"  load {got[warmup]['load_s']:.2f} s (shards "
                  f"{', '.join(f'{s:.2f}' for s in got[warmup]['shard_load_s'])} s)",
                  flush=True)
    print(f"\n{'warm-up':<10} {'load s':>7} {'level':>5}  {'first TTFT p50/max ms':>22}  "
          f"{'gap ms':>8}  {'again TTFT p50/max ms':>22}  {'gap ms':>8}")
    for warmup, res in got.items():
        for c, rounds in res["levels"].items():
            f, a = rounds["first"], rounds["again"]
            print(f"{warmup:<10} {res['load_s']:7.2f} {c:>5}  "
                  f"{f['ttft_p50_s'] * 1e3:10.1f} /{f['ttft_max_s'] * 1e3:10.1f}  "
                  f"{f['max_gap_s'] * 1e3:8.1f}  "
                  f"{a['ttft_p50_s'] * 1e3:10.1f} /{a['ttft_max_s'] * 1e3:10.1f}  "
                  f"{a['max_gap_s'] * 1e3:8.1f}")
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "dtype": args.dtype,
                                         "layers": args.layers, "nodes": args.nodes,
                                         "tokens": args.tokens, "results": got}, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
