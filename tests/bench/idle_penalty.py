"""Benchmark: how much slower is a shard's forward when the machine was idle before it?

In a pipeline each shard computes a third of the time and waits for the ring the rest.
This script runs a model's three uniform shards back to back in this one process (the
nodes' own code: node/batch.py `ShardBatch`, greedy decode of `--tokens` tokens), with
nothing but the gap between forwards changed from one pass to the next:

- `none`: each forward starts as soon as the one before it ends (what one mlx_lm
  process does);
- `sleep`: the process sleeps `--gap-ms` before each forward (what a shard of a 3-node
  pipeline does while the others compute);
- `spin`: it busy-waits the same time instead, keeping a core awake.

Prints the p50 of each shard's forward and their sum for each pass, twice over. Run it
with the nodes' BLAS (node/blas.py; the script re-executes itself with OpenBLAS where it
is installed).

    .venv/bin/python tests/bench/idle_penalty.py [--model smollm2-135m] [--gap-ms 45]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from node.blas import reexec_with_openblas  # noqa: E402
from tests.bench.common import add_model_arguments, prompt_ids  # noqa: E402


def wait(mode: str, seconds: float) -> None:
    if mode == "sleep":
        time.sleep(seconds)
    elif mode == "spin":
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass


def one_pass(shards: list, ids: list[int], tokens: int, mode: str,
             gap_s: float) -> list[float]:
    """Greedy decode through the shards in turn; each shard's forward p50 (seconds)."""
    from node.batch import ShardBatch, Step
    from node.sampling import Sampling

    batches = [ShardBatch(s) for s in shards]
    times: list[list[float]] = [[] for _ in shards]

    def token(inputs: list[int], position: int, timed: bool) -> int:
        out = None
        for k, batch in enumerate(batches):
            wait(mode, gap_s)
            t0 = time.perf_counter()
            step = (Step("r", position, tokens=inputs) if k == 0 else
                    Step("r", position, hidden=out.hidden))
            if k == len(batches) - 1:
                step.sample = Sampling()
            out = batch.run([step])[0]
            if isinstance(out, Exception):
                raise out
            if timed:
                times[k].append(time.perf_counter() - t0)
        return out.token

    next_id, position = token(ids, 0, False), len(ids)
    for _ in range(tokens):
        next_id = token([next_id], position, True)
        position += 1
    return [statistics.median(t) for t in times]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--gap-ms", type=float, default=45.0)
    args = parser.parse_args()
    reexec_with_openblas()

    from node.blas import openblas_path
    from node.models import load_shard, resolve

    source = resolve(args.model, args.dtype, args.layers)
    n = source.n_layers
    cuts = [0, n // 3, 2 * n // 3, n]
    shards = [load_shard(source, a, b - 1) for a, b in zip(cuts, cuts[1:])]
    ids = prompt_ids(args.model, args.layers)
    print(f"model {args.model}, shards {', '.join(f'{a}-{b - 1}' for a, b in zip(cuts, cuts[1:]))}"
          f", {args.tokens} tokens, gap {args.gap_ms:.0f} ms, BLAS "
          f"{openblas_path() or 'reference'}", flush=True)
    print(f"{'gap':<6} {'forward p50 per shard (ms)':<28} {'sum ms':>7}")
    for _ in range(2):
        for mode in ("none", "sleep", "spin"):
            p50 = one_pass(shards, ids, args.tokens, mode, args.gap_ms / 1e3)
            print(f"{mode:<6} {' + '.join(f'{t * 1e3:5.1f}' for t in p50):<28} "
                  f"{sum(p50) * 1e3:7.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
