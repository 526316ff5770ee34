"""Running a layer range of any mlx-lm model through the model's own code.

A shard keeps the whole mlx-lm model object, so its forward is the model's own: the
embedding (with any scaling), the masks and sliding windows, MoE routing, norms, logit
soft-capping and tied heads. Two small wrappers make it a shard:

- every layer outside the shard becomes a pass-through that returns its input and holds
  no weights (its original stays reachable for attributes such as `use_sliding`, but its
  parameters are never read);
- every kept layer is wrapped too: on a shard that is not first, the first one takes the
  received hidden state in place of its input, so the embedding is built but never
  evaluated; on a shard that is not last, the last one records its output, which is what
  the shard sends on (the norm and head are built but never evaluated); on the last
  shard, the last one keeps only the positions whose logits are wanted.

MLX is lazy: what a shard never evaluates is never computed. The layer list keeps its
length, so a forward that depends on a layer's index (gemma3's sliding-window pattern)
is unchanged. Caches: the kept layers have real mlx-lm caches (single or batched); a
pass-through layer's slot holds a kept layer's cache of the same kind (or a spare as far
along), so that a mask or offset the model reads from any slot is right. exo's
`auto_parallel` runs any model the same way, there with wrapped layers in a sliced list.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from node.errors import ModelError

# caches that hold one K/V entry per position and batch with mlx-lm's Batch*KVCache
KV_CACHES = ("KVCache", "RotatingKVCache")


class _Io:
    """What the wrappers exchange with the shard for one forward (not a Module: its
    arrays must never become parameters)."""

    def __init__(self) -> None:
        self.hidden: mx.array | None = None  # the received hidden state (not first)
        self.output: mx.array | None = None  # the last kept layer's output
        self.pick: mx.array | None = None  # last shard: positions [B] whose logits count


class _Delegating(nn.Module):
    """Reads attributes it lacks from the layer it stands for (a model's forward may ask a
    layer for `use_sliding`, `is_sliding` and so on)."""

    def __getattr__(self, key: str) -> Any:
        try:
            return super().__getattr__(key)
        except AttributeError:
            if key.startswith("_"):
                raise
            return getattr(self._layer(), key)

    def _layer(self) -> Any:
        raise NotImplementedError


class PassThrough(_Delegating):
    """A layer outside the shard: returns its input."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "_original", layer)  # not a child: no parameters

    def _layer(self) -> Any:
        return object.__getattribute__(self, "_original")

    def __call__(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        return x


class Kept(_Delegating):
    """A layer of the shard. The first one (`entry`, on a shard that is not first) takes
    the received hidden state in place of its input. The last one (`final`) either
    records its output (`exit`: a shard that is not last) or keeps only the positions
    whose logits are wanted (the last shard). The others start computing as soon as
    their graph is built, while Python builds the next layer's (what mlx_lm's
    generate_step gets from async_eval across tokens; a shard must wait for its input, so
    it overlaps across layers): about 10% faster decode of a small model on a CPU."""

    def __init__(self, layer: nn.Module, io: _Io, entry: bool, final: bool,
                 exit: bool) -> None:
        super().__init__()
        self["layer"] = layer  # a child: its parameters are this shard's
        for name, value in (("_io", io), ("_entry", entry), ("_final", final),
                            ("_exit", exit)):
            object.__setattr__(self, name, value)

    def _layer(self) -> Any:
        return self["layer"]

    def __call__(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        get = object.__getattribute__
        io = get(self, "_io")
        if get(self, "_entry"):
            x = io.hidden
        out = self["layer"](x, *args, **kwargs)
        if not get(self, "_final"):
            mx.async_eval(out[0] if isinstance(out, tuple) else out)
        else:
            if get(self, "_exit"):
                io.output = out
            elif io.pick is not None:  # last shard: the head runs on these positions only
                if isinstance(out, tuple):  # (hidden states, what the next layer shares)
                    return (_take(out[0], io.pick), *out[1:])
                out = _take(out, io.pick)
        return out


def _take(hidden: mx.array, positions: mx.array) -> mx.array:
    """Position positions[b] of each row b of hidden states [B, L, hidden]: [B, 1, hidden]."""
    return mx.take_along_axis(hidden, positions[:, None, None], axis=1)


def layer_list(model: Any) -> list:
    """The model's own list of transformer blocks, `model.model.layers` or `model.layers`:
    the list object itself, so that replacing an entry changes the model (the `layers`
    property of many mlx-lm models returns a copy: a slice of its pipeline layers)."""
    for owner in (getattr(model, "model", None), model):
        layers = getattr(owner, "layers", None) if owner is not None else None
        if isinstance(layers, list) and layers:
            return layers
    raise ModelError(f"mlx-lm's {type(model).__module__} model has no list of layers, so it "
                     "cannot be split by layers; run it on one node")


RECURRENT = ("ArraysCache", "MambaCache")


def cache_kinds(model: Any) -> list:
    """The model's own per-layer caches (mlx-lm's make_prompt_cache), one per layer and each
    a per-position key/value cache; anything else is refused with the reason."""
    from mlx_lm.models.cache import make_prompt_cache

    name = type(model).__module__.removeprefix("mlx_lm.models.")
    caches = make_prompt_cache(model)
    kinds = {type(c).__name__ for c in caches}
    if kinds & set(RECURRENT):
        raise ModelError(
            f"mlx-lm's {name} model keeps recurrent state ({', '.join(sorted(kinds))}), not a "
            "key/value cache per layer, so it cannot be split by layers across nodes; run it "
            "on one node")
    if kinds - set(KV_CACHES):
        raise ModelError(
            f"mlx-lm's {name} model keeps {', '.join(sorted(kinds - set(KV_CACHES)))} caches, "
            "which this cluster cannot split or batch yet; run it on one node")
    n = len(layer_list(model))
    if len(caches) != n:
        raise ModelError(
            f"mlx-lm's {name} model keeps {len(caches)} caches for its {n} layers (layers share "
            "or repeat them), so it cannot be split by layers across nodes; run it on one node")
    return caches


def _kind(cache: Any) -> tuple:
    return (type(cache).__name__, getattr(cache, "max_size", None), getattr(cache, "keep", None))


@dataclass
class ShardModel:
    """Layers start..end of an mlx-lm model, run through the model's own forward."""

    model: Any
    start: int
    end: int
    n_layers: int

    def __post_init__(self) -> None:
        layers = layer_list(self.model)
        self._kinds = [_kind(c) for c in cache_kinds(self.model)]
        self._io = _Io()
        self.first, self.last = self.start == 0, self.end == self.n_layers - 1
        for i in range(self.n_layers):
            if not self.start <= i <= self.end:
                layers[i] = PassThrough(layers[i])
        for i in range(self.start, self.end + 1):
            layers[i] = Kept(layers[i], self._io, entry=i == self.start and not self.first,
                             final=i == self.end, exit=not self.last)
        # a pass-through layer's cache slot: the nearest kept layer's cache of the same
        # kind, or (no kept layer of that kind, so its mask is never used) a spare one that
        # only knows the offset (_spare)
        kept = range(self.start, self.end + 1)
        self._slot: list[int | None] = []
        for i in range(self.n_layers):
            same = [j for j in kept if self._kinds[j] == self._kinds[i]]
            self._slot.append(i - self.start if self.start <= i <= self.end else
                              (min(same, key=lambda j: abs(j - i)) - self.start) if same
                              else None)

    @property
    def kept_layers(self) -> list:
        return layer_list(self.model)[self.start:self.end + 1]

    def parameters_used(self) -> list:
        """What this shard evaluates: its layers, plus what lies outside the layer list
        where the shard needs it: the embedding (every nn.Embedding outside the layers) on
        the first shard, the rest (norm, head) on the last, and the embedding there too
        when the head is tied to it. Layers outside the shard are pass-throughs whose
        weights are not in the model's tree any more."""
        import mlx.nn as nn
        from mlx.utils import tree_flatten

        kept = [p for layer in self.kept_layers for _, p in tree_flatten(layer.parameters())]
        seen = {id(p) for p in kept}
        embedding: list = []
        for _, module in self.model.named_modules():
            if isinstance(module, nn.Embedding | nn.QuantizedEmbedding):
                embedding += [p for _, p in tree_flatten(module.parameters())
                              if id(p) not in seen]
        seen |= {id(p) for p in embedding}
        rest = [p for _, p in tree_flatten(self.model.parameters()) if id(p) not in seen]
        tied = getattr(self.model, "tie_word_embeddings", None)  # gemma3 decides it itself
        if not isinstance(tied, bool):
            tied = getattr(getattr(self.model, "args", None), "tie_word_embeddings", None)
        if not isinstance(tied, bool):  # no such setting: tied when there is no projection
            tied = not any(p.ndim >= 2 for p in rest)
        used = list(kept)
        if self.first or (self.last and tied):
            used += embedding
        if self.last:  # a tied model's unused lm_head (gemma3 makes one) stays unread
            used += [p for p in rest if not (tied and p.ndim >= 2)]
        return used

    def make_cache(self) -> list:
        """A new request's caches: the model's own, for the kept layers."""
        from mlx_lm.models.cache import make_prompt_cache

        return make_prompt_cache(self.model)[self.start:self.end + 1]

    def _spare(self, kept: Any, batch: int) -> Any:
        """The cache slot of a pass-through layer whose cache kind no kept layer has: never
        written, but as far along as the kept caches, since model code may read any slot's
        offset (ministral3 scales attention by cache[0].offset)."""
        from mlx_lm.models.cache import BatchKVCache, KVCache

        spare = BatchKVCache([0] * batch) if batch > 1 else KVCache()
        spare.offset = kept.offset
        for attr in ("left_padding", "_idx"):  # a batch: the same rows, padding and length
            if batch > 1 and hasattr(kept, attr):
                setattr(spare, attr, getattr(kept, attr))
        return spare

    def probe(self, hidden_size: int, dtype: Any) -> None:
        """One position through this shard with throwaway caches, at load: a model whose
        layers hand each other more than the hidden state (a tuple, a shared cache) fails
        here, before any request does."""
        x = (mx.zeros((1, 1), dtype=mx.int32) if self.first
             else mx.zeros((1, 1, hidden_size), dtype=dtype))
        mx.eval(self.forward(x, self.make_cache(), pick=mx.array([0]) if self.last else None))

    def forward(self, x: mx.array, caches: list, pick: mx.array | None = None) -> mx.array:
        """One forward of this shard. `x`: token ids [B, L] on the first shard, hidden
        states [B, L, hidden] on the others. `caches`: the kept layers' caches (single or
        batched). Returns the last kept layer's hidden states [B, L, hidden] (not last),
        or logits (last shard): [B, L, vocab], or [B, 1, vocab] at `pick` [B]."""
        io = self._io
        batch, length = x.shape[0], x.shape[1]
        if self.first:
            tokens = x
        else:
            io.hidden = x
            tokens = mx.zeros((batch, length), dtype=mx.int32)  # the embedding stays unused
        io.pick = pick if self.last else None
        full = [caches[s] if s is not None else self._spare(caches[0], batch)
                for s in self._slot]
        try:
            out = self.model(tokens, cache=full)
            if not self.last:
                out = io.output
        finally:
            io.hidden = io.output = io.pick = None
        return out
