"""Benchmark: does a long prompt stall the streams that are decoding when it arrives?

Starts a local cluster of `--nodes` nodes (default 2) on 127.0.0.1, node i pinned to its
own core (`--cpus-per-node 1`; with fewer cores than nodes, `--oversubscribe` is passed
and said), and loads the model with `--microbatches` K decode groups (default 2; 1 to
compare). It starts `--streams` greedy streaming requests (default 8) of `--tokens`
tokens each, EOS ignored, and once they decode steadily records their inter-token gaps
for `--before-s` seconds ("before"). Then it sends one request whose prompt is
`--long-prompt` token ids (default 2,000, seeded, drawn as the bench draws its prompts:
console/workload.py) and records the other streams' gaps from the moment it was sent
until its first token came ("during its prefill": every gap that overlaps that interval).

Prints the p50 gap before, the p99 and max gap during, the ratio p99 during / p50 before,
the long request's TTFT, and PASS or FAIL against `--max-ratio` (default 3).

    .venv/bin/python tests/bench/prefill_stall.py [--microbatches 1] [--json out.json]
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
from console.workload import Route, percentiles, workload_prompts  # noqa: E402
from protos import cluster_pb2 as pb  # noqa: E402
from tests.bench.common import add_model_arguments  # noqa: E402


def gaps(times: list[float], start: float, end: float) -> list[float]:
    """The gaps between consecutive arrivals that overlap [start, end]."""
    return [b - a for a, b in zip(times, times[1:]) if b > start and a < end]


async def stream(route: Route, ids: list[int], tokens: int, timeout_s: float,
                 arrivals: list[float]) -> None:
    """One request of `tokens` tokens (EOS ignored); each token's arrival is appended."""
    request = pb.GenerateRequest(prompt_ids=ids, max_tokens=tokens, ignore_eos=True,
                                 timeout_s=timeout_s)
    async for event in route.stream(request):
        if event.HasField("token"):
            arrivals.append(time.monotonic())


async def wait_until(condition, deadline: float, what: str) -> None:
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def measure(addresses: list[str], args: argparse.Namespace) -> dict:
    async with ops.connect(addresses) as clients:
        plan, _ = await ops.load_plan(clients, args.model, args.dtype, args.layers,
                                      args.strategy, progress=lambda m: None,
                                      microbatches=args.microbatches, auto_rejoin=False)
        route = Route(clients)
        short = workload_prompts(args.model, args.streams, args.prompt, args.seed)
        long_ids = workload_prompts(args.model, 1, args.long_prompt, args.seed + 1000)[0]
        # warm-up, alone, with prompts of their own (the measured ones must not find
        # their prefix in the nodes' prompt caches)
        warm = workload_prompts(args.model, 2, args.long_prompt, args.seed + 2000)
        await stream(route, warm[0][: args.prompt], 4, args.timeout_s, [])
        await stream(route, warm[1], 2, args.timeout_s, [])

        deadline = time.monotonic() + args.timeout_s
        arrivals: list[list[float]] = [[] for _ in short]
        tasks = [asyncio.create_task(stream(route, ids, args.tokens, args.timeout_s, times))
                 for ids, times in zip(short, arrivals)]
        long_times: list[float] = []
        long_task = None
        try:
            await wait_until(lambda: all(arrivals) or any(t.done() for t in tasks), deadline,
                             "every stream's first token")
            await asyncio.sleep(args.settle_s)  # the streams settle into steady decoding
            t_before = time.monotonic()
            await asyncio.sleep(args.before_s)
            t_sent = time.monotonic()
            long_task = asyncio.create_task(stream(route, long_ids, 2, args.timeout_s,
                                                   long_times))
            await wait_until(lambda: long_times or long_task.done(), deadline,
                             "the long request's first token")
            if not long_times:
                await long_task  # its error
                raise RuntimeError("the long request ended without a token")
            t_first = long_times[0]
            # the gap that spans t_first ends with the stream's next token
            await asyncio.sleep(min(2.0, max(0.2, 3 * (t_first - t_sent))))
        finally:
            for task in [*tasks, *([long_task] if long_task else [])]:
                task.cancel()
            done = await asyncio.gather(*tasks, *([long_task] if long_task else []),
                                        return_exceptions=True)
        errors = [repr(e) for e in done if isinstance(e, BaseException)
                  and not isinstance(e, asyncio.CancelledError)]
        if errors:
            raise RuntimeError(f"stream(s) failed: {errors[:3]}")
    before = [g for times in arrivals for g in gaps(times, t_before, t_sent)
              if times[0] < t_before]
    during = [g for times in arrivals for g in gaps(times, t_sent, t_first)]
    covered = all(times[-1] > t_first for times in arrivals)
    p50_before = percentiles(before)["p50"]
    p99_during = percentiles(during)["p99"]
    ratio = p99_during / p50_before if p50_before else float("inf")
    return {"model": args.model, "nodes": len(addresses), "microbatches": plan.microbatches,
            "cpus_per_node": args.cpus_per_node, "oversubscribe": args.oversubscribe,
            "streams": args.streams, "stream_prompt_tokens": args.prompt,
            "long_prompt_tokens": args.long_prompt,
            "gap_before_p50_s": p50_before, "gaps_before": len(before),
            "gap_during_p50_s": percentiles(during)["p50"], "gap_during_p99_s": p99_during,
            "gap_during_max_s": percentiles(during)["max"], "gaps_during": len(during),
            "ratio": ratio, "long_ttft_s": t_first - t_sent,
            "streams_covered_prefill": covered, "max_ratio": args.max_ratio,
            "passed": ratio <= args.max_ratio and covered}


async def main(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cluster.json"
        cluster = await asyncio.to_thread(
            local.up, args.nodes, path=path, node_args=["--no-advertise"],
            cpus_per_node=args.cpus_per_node, oversubscribe=args.oversubscribe)
        try:
            return await measure([n["address"] for n in cluster["nodes"]], args)
        finally:
            await asyncio.to_thread(local.down, path)


def report(res: dict) -> None:
    print(f"K={res['microbatches']} {res['nodes']} nodes x {res['cpus_per_node']} core(s)"
          f"{' (oversubscribed)' if res['oversubscribe'] else ''}, {res['streams']} streams, "
          f"a {res['long_prompt_tokens']}-token prompt")
    print(f"  gap p50 before         {res['gap_before_p50_s'] * 1e3:8.1f} ms "
          f"({res['gaps_before']} gaps)")
    print(f"  gap p99 during prefill {res['gap_during_p99_s'] * 1e3:8.1f} ms "
          f"({res['gaps_during']} gaps, p50 {res['gap_during_p50_s'] * 1e3:.1f} ms)")
    print(f"  gap max during prefill {res['gap_during_max_s'] * 1e3:8.1f} ms")
    print(f"  ratio p99 during / p50 before {res['ratio']:.2f} (at most {res['max_ratio']:g})")
    print(f"  long request TTFT      {res['long_ttft_s']:8.2f} s")
    if not res["streams_covered_prefill"]:
        print("  the streams ended before the long prompt's first token: raise --tokens")
    print("PASS" if res["passed"] else "FAIL")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--microbatches", type=int, default=2,
                        help="decode groups in flight (1: one batch in lockstep)")
    parser.add_argument("--strategy", default="uniform")
    parser.add_argument("--cpus-per-node", type=int, default=1)
    parser.add_argument("--oversubscribe", action="store_true",
                        help="share cores when nodes x cores exceeds the machine's "
                             "(set by itself when needed)")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=32, help="each stream's prompt tokens")
    parser.add_argument("--tokens", type=int, default=256, help="each stream's tokens")
    parser.add_argument("--long-prompt", type=int, default=2000)
    parser.add_argument("--settle-s", type=float, default=3.0)
    parser.add_argument("--before-s", type=float, default=3.0)
    parser.add_argument("--max-ratio", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout-s", type=float, default=300.0)
    parser.add_argument("--json", default="", help="also write the results here")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
        (os.cpu_count() or 1)
    if args.cpus_per_node and args.nodes * args.cpus_per_node > cores and \
            not args.oversubscribe:
        print(f"{args.nodes} nodes x {args.cpus_per_node} core(s) > {cores} core(s) here: "
              "oversubscribing (nodes share cores; the gaps measure the sharing too)")
        args.oversubscribe = True
    result = asyncio.run(asyncio.wait_for(main(args), args.timeout_s + 120))
    report(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
