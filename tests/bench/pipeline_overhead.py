"""Benchmark: what does splitting a model over a 3-node loopback pipeline cost?

Prints, from one run on this machine: single-process mlx_lm decode tokens/s, 3-node
pipeline decode tokens/s for the same model and prompt, their ratio, how many hops went
by the nodes' data ports (node/datalink.py) rather than the Forward RPC, and p50/p99 of
one activation hop (sender's clock to receiver's clock; valid because all nodes share one
host) and of its part up to the receiving process's read of the bytes (hop_wire: building
the frame, writing it, the kernel, waking the receiver; the rest is parsing and handing it
to the shard), plus the per-token compute vs transfer split seen by the first shard.

    .venv/bin/python tests/bench/pipeline_overhead.py [--model smollm2-135m] [--tokens 128]
    .venv/bin/python tests/bench/pipeline_overhead.py --model synthetic:qwen3-1.7b --layers 8
    .venv/bin/python tests/bench/pipeline_overhead.py --floor   # + the bare ring, interleaved

`--floor` adds a third side to each round: the same three shards in three bare processes
over blocking loopback sockets (tests/bench/pipeline_floor.py), the most a 3-process
pipeline gets on this machine at that moment with the nodes' shard code and no node
stack around it.

Both sides run with the same BLAS (OpenBLAS preloaded where installed) and greedy
decoding with EOS ignored, so they generate the same number of tokens. Runs alternate
(single, pipeline, single, ...) so that a noisy shared machine slows both alike.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from console import local, ops  # noqa: E402
from protos import cluster_pb2 as pb  # noqa: E402
from tests.bench.common import (  # noqa: E402
    add_model_arguments,
    prompt_ids,
    single_process,
)
from tests.bench.pipeline_floor import bare_ring  # noqa: E402


async def interleaved(addresses: list[str], model: str, ids: list[int], tokens: int,
                      repeats: int, layers: int = 0, dtype: str = "",
                      floor: list | None = None) -> tuple[list[float], list[float], dict, int]:
    """Alternate single-process and pipeline runs so machine noise hits both alike."""
    async with ops.connect(addresses) as clients:
        await ops.load_plan(clients, model, dtype, layers, "uniform", progress=lambda m: None)
        request = pb.GenerateRequest(prompt_ids=ids, max_tokens=tokens, ignore_eos=True)

        async def pipeline_once() -> float:
            async for event in clients[0].generate(request):
                if event.HasField("done"):
                    return event.done.decode_tokens_per_s
            raise RuntimeError("no done event")

        await pipeline_once()  # warm-up
        single, piped = [], []
        for i in range(repeats):
            single.append((await asyncio.to_thread(single_process, model, ids, tokens, layers,
                                                   dtype))[
                "decode_tokens_per_s"])
            piped.append(await pipeline_once())
            line = (f"  run {i + 1}/{repeats}: single {single[-1]:.2f} tok/s, "
                    f"pipeline {piped[-1]:.2f} tok/s")
            if floor is not None:  # the bare ring beside the idle nodes
                floor.append(await asyncio.to_thread(
                    bare_ring, model, layers, dtype, tokens))
                line += f", bare ring {floor[-1]['tokens_per_s']:.2f} tok/s"
            print(line, flush=True)
        metrics = [await c.metrics() for c in clients]
        links = 0  # neighbours that sent on the data port (node/datalink.py), not by gRPC
        for c in clients:
            call = c.stub.WatchMetrics(pb.WatchRequest(hz=50))
            links += (await call.read()).counters["data_links"] > 0
            call.cancel()
    lat: dict[str, list] = {}
    for m in metrics:
        for summary in m.latencies:
            lat.setdefault(summary.name, []).append(summary)
    return single, piped, lat, links


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--floor", action="store_true",
                        help="also run the bare 3-process ring (pipeline_floor.py) each round")
    args = parser.parse_args()
    if args.floor and args.nodes != 3:
        parser.error("--floor compares with a 3-process ring: use --nodes 3")

    ids = prompt_ids(args.model, args.layers)
    print(f"model {args.model}{f' ({args.layers} layers)' if args.layers else ''}, "
          f"prompt {len(ids)} tokens, {args.tokens} generated tokens, "
          f"{args.repeats} interleaved repeats, {os.cpu_count()} CPUs", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cluster.json"
        cluster = local.up(args.nodes, path=path)
        try:
            addresses = [n["address"] for n in cluster["nodes"]]
            floor: list | None = [] if args.floor else None
            single, piped, lat, links = asyncio.run(interleaved(
                addresses, args.model, ids, args.tokens, args.repeats, args.layers, args.dtype,
                floor))
        finally:
            local.down(path)
    s, p = statistics.median(single), statistics.median(piped)
    paired = statistics.median(b / a for a, b in zip(single, piped))
    print(f"single-process mlx_lm decode : {s:7.2f} tok/s (median)")
    print(f"{args.nodes}-node pipeline decode    : {p:7.2f} tok/s (median)")
    print(f"ratio pipeline / single      : {p / s:7.3f}   (median of paired runs {paired:.3f})")
    if floor:
        bare = [f["tokens_per_s"] for f in floor]
        b = statistics.median(bare)
        print(f"bare 3-process ring (floor)  : {b:7.2f} tok/s (median); / single {b / s:.3f} "
              f"(paired {statistics.median(y / x for x, y in zip(single, bare)):.3f}); "
              f"pipeline / bare {p / b:.3f} (paired "
              f"{statistics.median(x / y for x, y in zip(piped, bare)):.3f})")
        print(f"bare ring hop p50            : "
              f"{statistics.median(f['hop_p50_s'] for f in floor) * 1e3:7.3f} ms; forwards "
              + " + ".join(f"{statistics.median(f['forward_p50_s'][k] for f in floor) * 1e3:.1f}"
                           for k in range(3)) + " ms")
    print(f"hops on the data port        : {links} of {args.nodes} (the others by the Forward RPC)")
    for name in ("hop", "hop_wire", "step_compute", "token_latency", "token_compute",
                 "token_transfer"):
        for summary in lat.get(name, []):
            print(f"{name:15} n={summary.count:<6} p50 {summary.p50_s * 1e3:8.3f} ms   "
                  f"p99 {summary.p99_s * 1e3:8.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
