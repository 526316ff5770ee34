"""Exact memory sizes of any mlx-lm model, measured on mlx-lm's own classes, for plans.

`measure_shape` builds the model from its config with mlx-lm's `Model(ModelArgs)`,
quantizes it the way mlx-lm loads a quantized MLX directory, and reads the byte size of
every parameter: per layer (experts, q/k norms, biases and quantization scales included),
the input embedding, and the final norm + head. mlx arrays are lazy, so building costs no
memory and shapes, dtypes and `nbytes` are known without computing anything: nothing here
ever evaluates the model (a 30B model measures in milliseconds and allocates nothing).

The KV cache comes from mlx-lm's own `make_prompt_cache`: a `KVCache` layer grows with
the context, a `RotatingKVCache` (sliding window) or `ChunkedKVCache` layer keeps a bounded
number of positions. Architectures whose caches are not KV caches (state-space, linear
attention, quantized caches) are refused with a ModelError.
"""

from __future__ import annotations

from typing import Any

from node.errors import ModelError
from node.memory import settle_random_key
from node.plan import DTYPE_BYTES, ModelShape


def build_model(config: dict, spec: str) -> Any:
    """mlx-lm's own Model for a config, parameters lazy (nothing is computed)."""
    from mlx_lm.utils import _get_classes

    try:
        model_class, args_class = _get_classes(config)
    except ValueError as e:  # mlx-lm: "Model type ... not supported."
        raise ModelError(f"{spec}: mlx-lm {mlx_lm_version()} has no architecture "
                         f"{config.get('model_type')!r} ({e}); upgrade mlx-lm or use another "
                         "model") from None
    try:
        model = model_class(args_class.from_dict(config))
    except Exception as e:  # the model's own code rejects the config
        raise ModelError(f"{spec}: mlx-lm cannot build a {config.get('model_type')} model "
                         f"from this config ({type(e).__name__}: {e})") from e
    settle_random_key()  # its layers' initial draws leave a graph on the global key
    return model


def mlx_lm_version() -> str:
    from importlib.metadata import version

    return version("mlx-lm")


def build_quantized(config: dict) -> Any:
    """mlx-lm's model for `config`, quantized as its `quantization` entry says. Lazy: no
    parameter is computed until someone evaluates it (this module never does)."""
    model = build_model(config, str(config.get("model_type")))
    _quantize(model, config)
    return model


def _quantize(model: Any, config: dict) -> None:
    """Quantize as mlx-lm's `load_model` does for a quantized MLX directory: per-path
    entries of config["quantization"] first, then (as `convert` chose them) every module
    with `to_quantized` whose input dimension divides by the group size, subject to the
    model's own `quant_predicate`. Embeddings are quantized too."""
    quant = config.get("quantization")
    if not quant:
        return
    import mlx.nn as nn

    group = int(quant.get("group_size", 64))
    bits = int(quant.get("bits", 4))
    mode = str(quant.get("mode", "affine"))
    own = getattr(model, "quant_predicate", None)

    def predicate(path: str, module: Any) -> bool | dict:
        if path in quant:  # per-path override: False or a dict of parameters
            return quant[path]
        weight = getattr(module, "weight", None)
        if not hasattr(module, "to_quantized") or weight is None or weight.shape[-1] % group:
            return False
        chosen = own(path, module) if own is not None else True
        if isinstance(chosen, dict) and weight.shape[-1] % int(chosen.get("group_size", group)):
            return False  # a shape mlx-lm could not have quantized this way
        return chosen

    nn.quantize(model, group_size=group, bits=bits, mode=mode, class_predicate=predicate)


def _layers(model: Any) -> list:
    layers = getattr(model, "layers", None)
    if layers is None:
        layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ModelError(f"mlx-lm's {type(model).__module__} model exposes no layer list "
                         "(model.layers): it cannot be split by layers")
    return list(layers)


def _setting(config: dict, key: str) -> Any:
    """A config value, looked up in a nested text_config too (multimodal configs)."""
    if config.get(key) is not None:
        return config[key]
    return (config.get("text_config") or {}).get(key)


def _kv_per_token(layer: Any, config: dict, act: int) -> int:
    """K+V bytes per position of one layer: 2 x KV heads x head dim x activation bytes.
    Taken from the layer's attention module where it says, else from the config."""
    heads = int(_setting(config, "num_attention_heads") or 1)
    kv_heads = int(_setting(config, "num_key_value_heads") or heads)
    head_dim = int(_setting(config, "head_dim")
                   or int(_setting(config, "hidden_size") or 0) // heads)
    for _, module in layer.named_modules():
        if isinstance(getattr(module, "n_kv_heads", None), int):
            kv_heads = module.n_kv_heads
            if isinstance(getattr(module, "head_dim", None), int):
                head_dim = module.head_dim
            break
    return 2 * kv_heads * head_dim * act


def _matrix_macs(module: Any, share: float) -> int:
    """Multiply-adds per token of one module's weight matrix (0 if it has none): its
    logical elements (a quantized matrix packs 32/bits of them in each stored word); a
    3-D matrix holds one slice per expert, of which a token uses `share`."""
    weight = module.get("weight") if isinstance(module, dict) else None
    if weight is None or getattr(weight, "ndim", 0) < 2:
        return 0
    bits = getattr(module, "bits", 0)
    elements = weight.size * 32 // bits if bits else weight.size
    return int(elements * (share if weight.ndim == 3 else 1.0))


def _expert_share(config: dict) -> float:
    """The share of a mixture-of-experts layer's experts one token runs through."""
    chosen = _setting(config, "num_experts_per_tok")
    experts = _setting(config, "num_local_experts") or _setting(config, "num_experts")
    return min(1.0, int(chosen) / int(experts)) if chosen and experts else 1.0


def _macs(model: Any, layers: list, in_layers: set, tied: bool, config: dict
          ) -> tuple[list[int], int]:
    """Multiply-adds per token of each layer and of the output head: the count of weight
    elements each token meets (an embedding lookup is free; the tied head is the token
    embedding used as a matrix). Decode time per layer follows it closely, since decode
    reads each weight once per step; attention over the context comes on top."""
    import mlx.nn as nn

    share = _expert_share(config)
    embeddings = (nn.Embedding, nn.QuantizedEmbedding)
    per_layer = [sum(_matrix_macs(m, share) for _, m in layer.named_modules()
                     if not isinstance(m, embeddings)) for layer in layers]
    head, tables = 0, [0]
    for path, m in model.named_modules():
        weight = m.get("weight") if isinstance(m, dict) else None
        if weight is None or id(weight) in in_layers or (tied and path.startswith("lm_head")):
            continue  # (a tied checkpoint has no lm_head: the class's own is dropped)
        if isinstance(m, embeddings):
            tables.append(_matrix_macs(m, share))
        else:
            head += _matrix_macs(m, share)
    return per_layer, head + (max(tables) if tied else 0)


def _windows(model: Any, n_layers: int) -> list[int]:
    """Positions each layer's cache keeps at most (0 = grows with the context)."""
    from mlx_lm.models.cache import (
        ChunkedKVCache,
        KVCache,
        RotatingKVCache,
        make_prompt_cache,
    )

    caches = make_prompt_cache(model)
    if len(caches) != n_layers:
        raise ModelError(f"mlx-lm's {type(model).__module__} model makes {len(caches)} caches "
                         f"for {n_layers} layers: its KV cache cannot be estimated per layer")
    windows = []
    for i, cache in enumerate(caches):
        if isinstance(cache, RotatingKVCache):
            windows.append(int(cache.max_size))
        elif isinstance(cache, ChunkedKVCache):
            windows.append(int(cache.chunk_size))
        elif isinstance(cache, KVCache):
            windows.append(0)
        else:
            raise ModelError(
                f"mlx-lm's {type(model).__module__} model keeps a {type(cache).__name__} at "
                f"layer {i}, not a KV cache: its memory cannot be estimated per position")
    return windows


def measure_shape(config: dict, dtype: str = "", context: int = 0) -> ModelShape:
    """Exact byte sizes of the model `config` describes, floating parameters as if cast to
    `dtype` (as mlx-lm's `set_dtype` casts them; quantized weights keep their integer
    type), KV cache in `dtype` (or the parameters' own dtype when `dtype` is empty)."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    if dtype and dtype not in DTYPE_BYTES:
        raise ModelError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPE_BYTES)}")
    model = build_quantized(config)
    layers = _layers(model)
    cast = DTYPE_BYTES.get(dtype, 0)

    def size(a: Any) -> int:
        if cast and mx.issubdtype(a.dtype, mx.floating):
            return a.size * cast
        return a.nbytes

    layer_sizes, in_layers = [], set()
    for layer in layers:
        arrays = [a for _, a in tree_flatten(layer.parameters())]
        in_layers.update(id(a) for a in arrays)
        layer_sizes.append(sum(size(a) for a in arrays))
    rest = [(p, a) for p, a in tree_flatten(model.parameters()) if id(a) not in in_layers]

    # the embedding: Embedding modules outside the layers (by name, if there are none)
    embed_prefixes = tuple(
        path + "." for path, m in model.named_modules()
        if isinstance(m, (nn.Embedding, nn.QuantizedEmbedding))
        and id(m.weight) not in in_layers)
    embedding = [(p, a) for p, a in rest if p.startswith(embed_prefixes)] if embed_prefixes \
        else [(p, a) for p, a in rest if "embed" in p]
    embed_paths = {p for p, _ in embedding}
    head = [(p, a) for p, a in rest if p not in embed_paths]
    tied = bool(_setting(config, "tie_word_embeddings"))
    if tied:  # a tied checkpoint has no lm_head: mlx-lm's sanitize drops one the class made
        head = [(p, a) for p, a in head if not p.startswith("lm_head.")]
    tied = tied or not any(a.ndim >= 2 for _, a in head)  # no output matrix: the embedding
    embed_bytes = sum(size(a) for _, a in embedding)
    # the tied head is the token embedding (the largest one, not a position table)
    tied_bytes = 0
    if tied and embedding:
        tables: dict[str, int] = {}
        for p, a in embedding:
            module = p.rsplit(".", 1)[0]
            tables[module] = tables.get(module, 0) + size(a)
        tied_bytes = max(tables.values())
    head_bytes = sum(size(a) for _, a in head) + tied_bytes

    if cast:
        act = cast
    else:  # the activations run in the parameters' floating dtype
        floats = [a for _, a in tree_flatten(model.parameters())
                  if mx.issubdtype(a.dtype, mx.floating)]
        act = floats[0].itemsize if floats else 4
    kv = [_kv_per_token(layer, config, act) for layer in layers]
    layer_macs, head_macs = _macs(model, layers, in_layers, tied, config)
    windows = _windows(model, len(layers))
    n = max(1, len(layers))
    return ModelShape(
        n_layers=len(layers), layer_bytes=-(-sum(layer_sizes) // n), embed_bytes=embed_bytes,
        head_bytes=head_bytes, kv_bytes_per_token=-(-sum(kv) // n),
        context_length=context or int(_setting(config, "max_position_embeddings") or 4096),
        layer_sizes=tuple(layer_sizes), kv_per_token=tuple(kv), kv_window=tuple(windows),
        tied_bytes=tied_bytes, layer_macs=tuple(layer_macs), head_macs=head_macs)
