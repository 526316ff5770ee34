"""Benchmark: how long streams stall when the model is reloaded in another split under
load, with the new plan loaded beside the serving one (the default) and in its place.

Starts a local cluster of `--nodes` nodes (default 3) and loads the model (uniform).
Each round streams `--streams` greedy requests of `--tokens` tokens (EOS ignored)
straight through the nodes (console.ops, as `mlx-cluster generate` does) and, after
`--after` tokens, loads the same model in the other split (uniform <-> a manual split),
staged or in place, taking turns. It reports, per mode, the longest gap between two
tokens of any stream (the stall a user sees), the load's own time, and whether every
stream gave the tokens of an undisturbed run.

    .venv/bin/python tests/bench/reload_gap.py [--model smollm2-135m] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from console import local, ops  # noqa: E402
from protos import cluster_pb2 as pb  # noqa: E402
from tests.bench.common import PROMPT, add_model_arguments  # noqa: E402


def manual_split(n_layers: int, nodes: int) -> str:
    """A split unlike uniform's: the first node takes half the layers."""
    first = n_layers // 2
    rest = n_layers - first
    cuts, start = [f"0-{first - 1}"], first
    for i in range(nodes - 1):
        size = rest // (nodes - 1) + (1 if i < rest % (nodes - 1) else 0)
        cuts.append(f"{start}-{start + size - 1}")
        start += size
    return "manual:" + ",".join(cuts)


async def round_(clients, args, request, reference, strategy: str, stage: bool) -> dict:
    arrivals: list[list[float]] = [[] for _ in range(args.streams)]
    go = asyncio.Event()

    async def stream(i: int) -> list[int]:
        ids = []
        async for event in ops.stream(clients, request):
            if event.HasField("token"):
                ids.append(event.token.token_id)
                arrivals[i].append(time.monotonic())
                if len(ids) == args.after:
                    go.set()
        return ids

    async def reload() -> float:
        await go.wait()
        t0 = time.monotonic()
        await ops.load_plan(clients, args.model, args.dtype, args.layers, strategy,
                            progress=lambda m: None, stage=stage)
        return time.monotonic() - t0

    *got, load_s = await asyncio.gather(*(stream(i) for i in range(args.streams)), reload())
    stall = max(b - a for times in arrivals for a, b in zip(times, times[1:]))
    return {"stage": stage, "stall_s": stall, "load_s": load_s,
            "exact": all(g == reference for g in got)}


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cluster.json"
        cluster = await asyncio.to_thread(local.up, args.nodes, path=path,
                                          node_args=["--no-advertise"])
        try:
            addresses = [n["address"] for n in cluster["nodes"]]
            async with ops.connect(addresses) as clients:
                plan, _ = await ops.load_plan(clients, args.model, args.dtype, args.layers,
                                              "uniform", progress=lambda m: None)
                request = pb.GenerateRequest(prompt=PROMPT, chat=True,
                                             max_tokens=args.tokens, ignore_eos=True)
                reference = (await ops.generate(clients, request)).token_ids
                splits = [manual_split(plan.n_layers, args.nodes), "uniform"]
                results = []
                for r in range(args.rounds):
                    for stage in (True, False):
                        split = splits[len(results) % 2]
                        res = await round_(clients, args, request, reference, split, stage)
                        results.append(res)
                        print(f"round {r + 1} {'staged  ' if stage else 'in place'} -> "
                              f"{split:24} longest stall {res['stall_s']:.2f} s, load "
                              f"{res['load_s']:.2f} s, exact {res['exact']}", flush=True)
        finally:
            await asyncio.to_thread(local.down, path)
    for stage in (True, False):
        mine = [r for r in results if r["stage"] is stage]
        print(f"{'staged beside the serving plan' if stage else 'in place (old plan first)':32}"
              f" longest stall median {statistics.median(r['stall_s'] for r in mine):.2f} s "
              f"(max {max(r['stall_s'] for r in mine):.2f}), load median "
              f"{statistics.median(r['load_s'] for r in mine):.2f} s, all exact: "
              f"{all(r['exact'] for r in mine)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--after", type=int, default=16, help="tokens before the reload")
    parser.add_argument("--rounds", type=int, default=3)
    asyncio.run(main(parser.parse_args()))
