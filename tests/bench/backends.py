"""Benchmark: the same model on the same 3-node loopback cluster, backend by backend.

Prints, from one run on this machine, decode tokens/s and p50/p99 inter-token latency for
single-process mlx_lm and for each backend (gRPC pipeline, mlx-ring:tensor,
mlx-ring:pipeline), each with its ratio to single-process, and whether every backend
produced the single-process tokens.

    .venv/bin/python tests/bench/backends.py [--model smollm2-135m] [--tokens 32]

Greedy decoding with EOS ignored, so every side generates the same number of tokens. The
single-process reference runs in a fresh process with the nodes' BLAS, before and after
the backends, so that drift on a shared machine shows up as two different figures.
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
from node.plan import BACKENDS  # noqa: E402
from protos import cluster_pb2 as pb  # noqa: E402
from tests.bench.common import prompt_ids, single_process  # noqa: E402


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else 0.0


async def run_backend(addresses: list[str], backend: str, model: str, ids: list[int],
                      tokens: int, repeats: int) -> dict:
    async with ops.connect(addresses) as clients:
        await ops.load_plan(clients, model, "", 0, "uniform", progress=lambda m: None,
                            backend=backend)
        entry, _ = await ops.entry_client(clients)
        return await timed_runs(entry, backend, ids, tokens, repeats)


async def timed_runs(entry, backend: str, ids: list[int], tokens: int, repeats: int) -> dict:
    """A warm-up, then `repeats` timed generations on the plan's entry node."""
    warm = pb.GenerateRequest(prompt_ids=ids, max_tokens=4, ignore_eos=True)
    async for _ in entry.generate(warm):
        pass
    request = pb.GenerateRequest(prompt_ids=ids, max_tokens=tokens, ignore_eos=True)
    speeds, itl, token_ids = [], [], []
    for i in range(repeats):
        token_ids = []
        async for event in entry.generate(request):
            if event.HasField("token"):
                token_ids.append(event.token.token_id)
                if event.token.index > 0:
                    itl.append(event.token.latency_s)
            else:
                speeds.append(event.done.decode_tokens_per_s)
        print(f"  {backend:18} run {i + 1}/{repeats}: {speeds[-1]:7.2f} tok/s", flush=True)
    return {"tok_s": statistics.median(speeds), "itl": itl, "tokens": token_ids}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--backends", default=",".join(BACKENDS))
    args = parser.parse_args()
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]

    ids = prompt_ids(args.model)
    print(f"model {args.model}, prompt {len(ids)} tokens, {args.tokens} generated tokens, "
          f"{args.repeats} run(s) per backend, 3 local nodes, {os.cpu_count()} CPUs",
          flush=True)
    singles = [single_process(args.model, ids, args.tokens)]
    print(f"  single-process     run 1: {singles[0]['decode_tokens_per_s']:7.2f} tok/s",
          flush=True)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cluster.json"
        cluster = local.up(3, path=path, node_args=["--no-advertise"])
        try:
            addresses = [n["address"] for n in cluster["nodes"]]
            for backend in backends:
                results[backend] = asyncio.run(run_backend(addresses, backend, args.model, ids,
                                                           args.tokens, args.repeats))
        finally:
            local.down(path)
    singles.append(single_process(args.model, ids, args.tokens))
    print(f"  single-process     run 2: {singles[1]['decode_tokens_per_s']:7.2f} tok/s",
          flush=True)
    base = statistics.fmean(s["decode_tokens_per_s"] for s in singles)
    rows = [("single-process mlx_lm", base, [x for s in singles for x in s["itl_s"]], True)]
    rows += [(b, r["tok_s"], r["itl"], r["tokens"] == singles[0]["token_ids"])
             for b, r in results.items()]
    print(f"\n{'backend':22} {'tok/s':>8} {'ratio':>7} {'ITL p50 ms':>11} {'ITL p99 ms':>11}"
          f"  same tokens")
    for name, tps, itl, same in rows:
        print(f"{name:22} {tps:8.2f} {tps / base:7.3f} {quantile(itl, 0.5) * 1e3:11.1f} "
              f"{quantile(itl, 0.99) * 1e3:11.1f}  {'yes' if same else 'NO'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
