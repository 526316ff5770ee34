"""A shard's prefix cache: the KV of recent prompts, so that a request whose prompt starts
with one of them computes only the rest (the next turn of a chat prefills the new turn,
not the whole conversation again).

The entries are held by mlx-lm's own `LRUPromptCache`, the one `mlx_lm.server` uses: a
trie of token ids, least-recently-used eviction bounded in bytes, and a longer entry
trimmed to the common prefix. What a shard of a split model adds:

- Every shard keeps its own entries, for its own layers, keyed by the prompt's token ids
  (a later shard learns them from the request's first frame). An entry is the KV of the
  prompt only: the positions after it hold generated tokens, which a middle shard never
  sees.
- The first shard chooses how many positions a request reuses (`adopt`, `length=None`);
  every later shard must then take exactly that many from its own entries (`adopt` with
  `length`). A later shard that has evicted them meanwhile raises `PrefixEvicted`, and the
  first shard runs the request again without reuse (node/runner.py).
- The last prompt position is always computed: its logits give the first token.

Runs on the node's MLX thread only (node/batch.py calls it), except the read-only `info`.
"""

from __future__ import annotations

from node.errors import PrefixEvicted
from protos import cluster_pb2 as pb

KEY = "shard"  # one store per shard (and per plan epoch): every entry is of this model
MAX_ENTRIES = 256  # prompts held at most, whatever their size (the byte bound rules)


class PromptStore:
    """The prefix cache of one shard, bounded to `max_bytes` (0: off)."""

    def __init__(self, max_bytes: int) -> None:
        from mlx_lm.models.cache import LRUPromptCache

        self.max_bytes = max(0, int(max_bytes))
        self._lru = LRUPromptCache(max_size=MAX_ENTRIES, max_bytes=self.max_bytes) \
            if self.max_bytes else None
        self.lookups = 0
        self.hits = 0
        self.tokens_reused = 0

    @property
    def enabled(self) -> bool:
        return self._lru is not None

    @property
    def nbytes(self) -> int:
        return self._lru.nbytes if self._lru is not None else 0

    def adopt(self, prompt: list[int], length: int | None = None) -> tuple[list | None, int]:
        """The caches to start a request with, and how many positions they hold: the
        longest cached prefix of `prompt` (at most all but its last position), or exactly
        `length` positions. (None, 0) when nothing is reused."""
        from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

        if length == 0:
            return None, 0
        caches, held = None, 0
        if self._lru is not None and prompt:
            self.lookups += 1
            caches, rest = self._lru.fetch_nearest_cache(KEY, prompt)
            held = len(prompt) - len(rest) if caches is not None else 0
        want = min(held, len(prompt) - 1) if length is None else length
        if not (0 < want <= held and (held == want or can_trim_prompt_cache(caches))):
            if length is not None:
                raise PrefixEvicted(
                    f"the first shard reuses {length} cached prompt positions, but this "
                    f"shard holds {held} it can use (evicted meanwhile, or its prefix cache "
                    "is off?)")
            return None, 0
        if held > want:
            trim_prompt_cache(caches, held - want)
        self.hits += 1
        self.tokens_reused += want
        return caches, want

    def insert(self, prompt: list[int], caches: list, length: int) -> bool:
        """Keep the KV of a request that ended: its first `length` positions, as far as
        they are prompt (the rest is trimmed off, then copied compactly). Caches that
        cannot be trimmed (a sliding window that wrapped, a recurrent state) are not kept
        unless they hold exactly the prompt."""
        import mlx.core as mx
        from mlx_lm.models.cache import KVCache, can_trim_prompt_cache, trim_prompt_cache

        n = min(length, len(prompt))
        if self._lru is None or n <= 0 or not caches:
            return False
        if length > n:
            if not can_trim_prompt_cache(caches):
                return False
            trim_prompt_cache(caches, length - n)
        for cache in caches:
            if type(cache) is KVCache and cache.keys is not None \
                    and cache.keys.shape[2] > cache.offset:
                # only its positions, not the rest of its growth step (nbytes counts both)
                cache.keys = mx.contiguous(cache.keys[..., :cache.offset, :])
                cache.values = mx.contiguous(cache.values[..., :cache.offset, :])
        mx.eval([c.state for c in caches])
        self._lru.insert_cache(KEY, list(prompt[:n]), caches)
        return True

    def close(self) -> None:
        """Free every entry and keep none from now on (the plan is gone)."""
        lru, self._lru = self._lru, None
        if lru is not None:
            lru.trim_to(n_sequences=0)

    def info(self) -> pb.PromptCache:
        lru = self._lru
        return pb.PromptCache(bytes=self.nbytes, max_bytes=self.max_bytes,
                              entries=len(lru) if lru is not None else 0,
                              lookups=self.lookups, hits=self.hits,
                              tokens_reused=self.tokens_reused)

