"""Warm-up at load: a new shard runs the batch sizes it serves once, before its plan goes
live, so that no request waits while MLX builds what it builds on a shape's first use.

On a GPU that is the kernels MLX compiles: tens of seconds for a 4-bit model's first
request on an H200, once per process (README, "First use on a GPU"). On a CPU first use
costs little, so by default (`auto`) only a GPU warms up. `mlx-node serve
--warmup-batches` names the sizes. Everything runs through the requests' own code
(node/batch.py `ShardBatch.run`) on the node's MLX thread.
"""

from __future__ import annotations

import time

from node.batch import ShardBatch, Step
from node.sampling import Sampling
from node.wire import encode_tensor

# every size up to 8, then the powers of two up to the engine's max_batch
# (node/engine.py `Tuning`)
GPU_WARMUP_BATCHES = [*range(1, 9), 16, 32, 64]


def auto_warmup_batches() -> list[int]:
    """MLX thread: the batch sizes to warm by default (GPU_WARMUP_BATCHES on a GPU, none on
    a CPU)."""
    import mlx.core as mx

    return [] if mx.default_device().type == mx.DeviceType.cpu else list(GPU_WARMUP_BATCHES)


def parse_batch_sizes(text: str) -> list[int] | None:
    """`--warmup-batches`: 'auto' (None), 'none' or '0' ([]), or sizes and ranges such as
    '1-8,16,32'."""
    text = text.strip().lower()
    if text == "auto":
        return None
    if text in ("none", "0", "off", ""):
        return []
    sizes: set[int] = set()
    for part in text.split(","):
        low, _, high = part.strip().partition("-")
        try:
            a, b = int(low), int(high or low)
        except ValueError:
            raise ValueError(f"not a batch size or range: {part!r} (try e.g. 1-8,16,32, "
                             "'auto' or 'none')") from None
        if not 1 <= a <= b <= 1024:
            raise ValueError(f"batch sizes must be between 1 and 1024, got {part!r}")
        sizes.update(range(a, b + 1))
    return sorted(sizes)


def warm(batch: ShardBatch, sizes: list[int] | None, positions: int = 8) -> tuple[list, float]:
    """MLX thread, at load, before any request: for each size (None: auto), run a short
    prefill and two decode steps for that many requests at once, through the same code as
    requests: prompts of different lengths (a padded prefill, then a decode group whose
    rows are at different positions), greedy and sampled rows. Leaves no request, group or
    cached prompt behind; returns the sizes warmed and the seconds it took."""
    import mlx.core as mx

    sizes = auto_warmup_batches() if sizes is None else sizes
    t0 = time.perf_counter()
    shard = batch.shard

    def inputs(n: int) -> dict:
        if shard.is_first:
            return {"tokens": [1] * n}
        h = mx.random.normal((1, n, shard.hidden_size), key=mx.random.key(n)) * 0.1
        return {"hidden": encode_tensor(h.astype(getattr(mx, shard.dtype)))}

    def sample(k: int) -> Sampling | None:
        if not shard.is_last:
            return None
        return Sampling() if k % 2 == 0 else Sampling(temperature=0.7, top_p=0.9, seed=k)

    for size in sizes:
        ids = [f"\x00warm-up {size}.{k}" for k in range(size)]  # no client id has \x00
        lengths = [positions + k % 4 for k in range(size)]
        try:
            for step in range(3):  # the prompts, then two decode steps
                for out in batch.run([
                        Step(r, 0 if step == 0 else n + step - 1, sample=sample(k),
                             **inputs(n if step == 0 else 1))
                        for k, (r, n) in enumerate(zip(ids, lengths))]):
                    if isinstance(out, Exception):
                        raise out
        finally:
            for r in ids:
                batch.requests.pop(r, None)
            batch.prune()  # their rows leave the group
    batch.cycle = 0.0  # warm-up steps say nothing of the ring's pace
    return sizes, time.perf_counter() - t0
