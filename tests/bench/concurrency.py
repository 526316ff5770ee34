"""Benchmark: does concurrency turn into throughput? Through the OpenAI gateway.

Starts a 3-node loopback cluster, loads the model, starts `mlx-cluster serve-api`, and
sends the same number of requests at concurrency 1, 2, 4, 8 and 16 with the official
`openai` client, EOS ignored (vLLM's `ignore_eos` extra parameter, which the gateway
accepts) so every request runs to max_tokens (checked). Prints
aggregate output tokens/s per level, its ratio to concurrency 1, and the mean batch size
the nodes' engines ran (rows per forward), all from this one run.

    .venv/bin/python tests/bench/concurrency.py [--model smollm2-135m] [--tokens 64]
    .venv/bin/python tests/bench/concurrency.py --model synthetic:qwen3-1.7b --layers 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import openai  # noqa: E402

from console import local, ops  # noqa: E402
from tests.bench.common import add_model_arguments  # noqa: E402

PROMPT = "Count slowly from one to one hundred, one number per line:"


async def forward_counters(addresses: list[str]) -> list[tuple[int, int]]:
    from protos import cluster_pb2 as pb

    out = []
    async with ops.connect(addresses) as clients:
        for client in clients:
            snap = await client.stub.WatchMetrics(pb.WatchRequest(hz=50)).read()
            out.append((snap.counters.get("forward_steps", 0),
                        snap.counters.get("forward_rows", 0)))
    return out


async def load(addresses: list[str], model: str, dtype: str, layers: int) -> None:
    async with ops.connect(addresses) as clients:
        await ops.load_plan(clients, model, dtype, layers, "uniform", progress=lambda m: None)


async def level(api: openai.AsyncOpenAI, model: str, concurrency: int, requests: int,
                tokens: int) -> tuple[float, int]:
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> int:
        async with gate:
            reply = await api.completions.create(model=model, prompt=f"{PROMPT} ({i})",
                                                 max_tokens=tokens, temperature=0,
                                                 extra_body={"ignore_eos": True})
            return reply.usage.completion_tokens

    t0 = time.perf_counter()
    counts = await asyncio.gather(*(one(i) for i in range(requests)))
    return sum(counts) / (time.perf_counter() - t0), min(counts)


async def run(addresses: list[str], url: str, model: str, levels: list[int], tokens: int,
              rounds: int) -> list[tuple[int, float, int, float]]:
    api = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0,
                             timeout=600)
    await level(api, model, 1, 1, 4)  # warm-up
    rows = []
    # concurrency 1 again at the end: on a shared machine the baseline drifts, and the
    # ratios use the mean of both
    for c in [*levels, levels[0]]:
        before = await forward_counters(addresses)
        tps, shortest = await level(api, model, c, c * rounds, tokens)
        after = await forward_counters(addresses)
        steps = sum(a[0] - b[0] for a, b in zip(after, before))
        rows_done = sum(a[1] - b[1] for a, b in zip(after, before))
        rows.append((c, tps, shortest, rows_done / steps if steps else 0.0))
        print(f"  concurrency {c:>2}: {tps:7.2f} tok/s aggregate, mean batch "
              f"{rows[-1][3]:.2f}", flush=True)
    await api.close()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2,
                        help="requests per level = concurrency x rounds")
    parser.add_argument("--levels", default="1,2,4,8,16")
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    print(f"model {args.model}{f' ({args.layers} layers)' if args.layers else ''}, "
          f"{args.tokens} tokens per request, {args.rounds} round(s) per "
          f"level, 3 local nodes, {os.cpu_count()} CPUs, through the OpenAI gateway",
          flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cluster.json"
        cluster = local.up(3, path=path, node_args=["--no-advertise"])
        api = None
        try:
            addresses = [n["address"] for n in cluster["nodes"]]
            asyncio.run(load(addresses, args.model, args.dtype, args.layers))
            ready = Path(tmp) / "api.json"
            api = subprocess.Popen([sys.executable, "-m", "console.cli", "serve-api", "--port",
                                    "0", "--nodes", ",".join(addresses), "--ready-file",
                                    str(ready)], cwd=ROOT, stderr=subprocess.DEVNULL)
            while not ready.exists():
                if api.poll() is not None:
                    sys.exit("the gateway did not start")
                time.sleep(0.05)
            url = json.loads(ready.read_text())["url"]
            rows = asyncio.run(run(addresses, url, args.model, levels, args.tokens,
                                   args.rounds))
        finally:
            if api is not None:
                api.send_signal(signal.SIGTERM)
                api.wait(10)
            local.down(path)
    rows, again = rows[:-1], rows[-1]
    base = (rows[0][1] + again[1]) / 2
    print(f"\nconcurrency {rows[0][0]} measured first and last: {rows[0][1]:.2f} and "
          f"{again[1]:.2f} tok/s; ratios are to their mean, {base:.2f}")
    print(f"\n{'concurrency':>11} {'tok/s':>8} {'ratio':>7} {'mean batch':>11}  all ran to "
          f"max_tokens")
    for c, tps, shortest, batch in rows:
        print(f"{c:>11} {tps:8.2f} {tps / base:7.2f} {batch:11.2f}  "
              f"{'yes' if shortest == args.tokens else f'no (shortest {shortest})'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
