"""Giving the memory of dropped weights back to the system.

A plan's weights are freed when a node drops its shard: on unload, when a replaced plan has
finished its requests, when a re-plan moves layers away. Three layers keep freed memory:
- Python's reference cycles, until the collector runs;
- MLX's buffer cache, which keeps freed buffers for reuse (`mx.clear_cache` empties it);
- glibc's malloc, below MLX on Linux. Each free of a block it had mapped raises its mmap
  threshold to that block's size, so later blocks of that size come from its heaps, and a
  heap gives pages back only from its top. Without a trim, a node that loads, stages and
  drops shards keeps the high-water mark of the plans it served: a 10-layer shard of
  smollm2-135m measured 472 MiB RSS after one re-plan and 813 MiB after the next, with the
  same MLX active memory. `malloc_trim(0)` returns the free pages of every arena.

One more thing keeps memory that no allocator can give back: MLX's global random key.
mlx.nn's layers draw their initial weights from it (mlx-lm builds every model with them,
before its weights are loaded), and each draw replaces the key with a lazy split of the
old one. Nothing evaluates it, so each model built lengthens one graph that holds every key
before it: about 0.45 MiB of native memory per smollm2-135m built, two builds per plan
loaded (sizing it, then loading it), 1.3 MiB per re-plan, found by a chaos soak whose nodes
grew by 5-15 % over 20 minutes. `settle_random_key` evaluates the key after each build,
which ends the chain (the values drawn are the same).

No library does the trim for us (MLX leaves the C allocator alone), hence the few
lines of ctypes; where the C library has no malloc_trim (macOS, musl) it is skipped.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc


@functools.cache
def _malloc_trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


def settle_random_key() -> None:
    """Evaluate MLX's global random key, so that it holds no graph of the keys before
    it (call after building a model; see the module docstring)."""
    import mlx.core as mx

    mx.eval(mx.random.state)


def release() -> None:
    """Collect cycles, empty MLX's buffer cache and give the C heap's free pages back.
    Runs on the MLX thread (it must not race a forward that is allocating)."""
    import mlx.core as mx

    gc.collect()
    mx.clear_cache()
    if (trim := _malloc_trim()) is not None:
        trim(0)

