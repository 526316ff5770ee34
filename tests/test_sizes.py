"""Measured model sizes (node.sizes) against the real bytes of mlx-lm models and caches.

The references are mlx-lm models built and quantized the way mlx-lm itself does it
(`quantize_model`, `set_dtype`), with only the parts under test evaluated."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from node.errors import ModelError
from node.plan import ModelShape
from node.sizes import measure_shape
from node.synthetic import SYNTHETIC, TINY_ARCHS

Q4 = {"group_size": 32, "bits": 4}
CASES = [(name, SYNTHETIC[name], "float32") for name in TINY_ARCHS] + [
    ("qwen3-q4", {**SYNTHETIC["qwen3"], "quantization": Q4}, "float16"),
    # hidden 128: mlx-lm quantizes qwen3_moe's router 8-bit in groups of 64
    ("qwen3_moe-q4", {**SYNTHETIC["qwen3_moe"], "hidden_size": 128, "quantization": Q4},
     "bfloat16"),
    ("gemma3_text-f16", SYNTHETIC["gemma3_text"], "float16"),
]


def reference_model(config: dict, dtype: str):
    """mlx-lm's model as a node would hold it: quantized by mlx-lm, cast by set_dtype."""
    from mlx_lm.utils import _get_classes, quantize_model

    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    if "quantization" in config:
        q = config["quantization"]
        quantize_model(model, {k: v for k, v in config.items() if k != "quantization"},
                       q["group_size"], q["bits"])
    model.set_dtype(getattr(mx, dtype))
    return model


def nbytes(*trees) -> int:
    """Bytes of the parameters in `trees`, evaluated first (so they are real arrays)."""
    mx.eval(trees)
    return sum(a.nbytes for t in trees for _, a in tree_flatten(t))


@pytest.mark.parametrize("name,config,dtype", CASES, ids=[c[0] for c in CASES])
def test_layer_embedding_and_head_bytes_match_evaluated_parameters(name, config, dtype):
    shape = measure_shape(config, dtype)
    assert shape.n_layers == config["num_hidden_layers"]
    model = reference_model(config, dtype)
    layers = nbytes(*(model.layers[i].parameters() for i in range(2, 6)))
    assert sum(shape.layer_sizes[2:6]) == pytest.approx(layers, rel=0.1)  # exact, today
    embed = model.model.embed_tokens.parameters()
    assert shape.embed_bytes == pytest.approx(nbytes(embed), rel=0.1)
    tied = config.get("tie_word_embeddings")
    head = nbytes(model.model.norm.parameters(), embed if tied else model.lm_head.parameters())
    assert shape.head_bytes == pytest.approx(head, rel=0.1)
    # the whole model on one node holds a tied embedding once
    whole = nbytes(model.layers[0].parameters()) * shape.n_layers
    assert shape.shard_bytes(0, shape.n_layers - 1, 0)[0] == pytest.approx(
        whole + nbytes(embed) + head - (nbytes(embed) if tied else 0), rel=0.1)


def test_quantization_shrinks_what_divides_by_the_group_and_honours_overrides():
    plain = measure_shape(SYNTHETIC["qwen3_moe"], "float16")
    q4 = measure_shape({**SYNTHETIC["qwen3_moe"], "quantization": Q4}, "float16")
    assert q4.layer_bytes < plain.layer_bytes / 2
    assert q4.embed_bytes < plain.embed_bytes / 2  # mlx-lm quantizes embeddings too
    kept = measure_shape({**SYNTHETIC["qwen3_moe"],
                          "quantization": {**Q4, "lm_head": False}}, "float16")
    assert kept.head_bytes == plain.head_bytes and kept.layer_sizes == q4.layer_sizes


@pytest.mark.parametrize("name", TINY_ARCHS)
def test_kv_estimate_matches_a_real_cache_after_256_positions(name):
    from mlx_lm.models.cache import make_prompt_cache

    config = SYNTHETIC[name]
    shape = measure_shape(config, "float32")
    model = reference_model(config, "float32")
    mx.eval(model.parameters())
    cache = make_prompt_cache(model)
    tokens = mx.array([list(range(256))]) % config["vocab_size"]
    model(tokens[:, :255], cache=cache)  # prefill, then one decode step: 256 positions
    model(tokens[:, 255:], cache=cache)
    mx.eval([c.state for c in cache])
    real = sum(c.nbytes for c in cache)
    estimate = shape.shard_bytes(0, shape.n_layers - 1, 256)[1]
    assert estimate == pytest.approx(real, rel=0.1)


def test_sliding_window_layers_keep_at_most_their_window():
    shape = measure_shape(SYNTHETIC["gemma3_text"], "float16")
    # sliding_window_pattern 3: every third layer is global, the others keep 8 positions
    assert shape.kv_window == (8, 8, 0, 8, 8, 0, 8, 8)
    per = shape.kv_per_token[0]
    assert per == 2 * 6 * 16 * 2
    assert shape.shard_bytes(0, 1, 100_000)[1] == 2 * 8 * per
    assert shape.shard_bytes(2, 2, 100_000)[1] == 100_000 * per
    assert shape.shard_bytes(0, 7, 4)[1] == 8 * 4 * per  # shorter than the window


def test_big_models_are_measured_without_allocating_them():
    measure_shape(SYNTHETIC["tiny"], "float16")  # mlx-lm imported outside the measurement
    mx.clear_cache()
    before = mx.get_active_memory()
    q8b = measure_shape(SYNTHETIC["qwen3-8b"], "float16")
    moe = measure_shape(SYNTHETIC["qwen3-30b-a3b"], "bfloat16")
    q4 = measure_shape({**SYNTHETIC["qwen3-30b-a3b"], "quantization": {"group_size": 64,
                                                                       "bits": 4}}, "bfloat16")
    assert mx.get_active_memory() - before < 1 << 20
    total = q8b.shard_bytes(0, q8b.n_layers - 1, 0)[0]
    assert total == pytest.approx(16.4e9, rel=0.1)  # 8.2B parameters x 2 bytes
    assert q8b.kv_per_token == (2 * 8 * 128 * 2,) * 36
    assert moe.shard_bytes(0, 47, 0)[0] == pytest.approx(61e9, rel=0.1)  # 30.5B x 2 bytes
    assert q4.shard_bytes(0, 47, 0)[0] == pytest.approx(17.2e9, rel=0.1)  # mlx-community 4bit


def test_caches_that_are_not_kv_caches_are_refused(monkeypatch):
    from mlx_lm.models import cache

    monkeypatch.setattr(cache, "make_prompt_cache",
                        lambda model: [cache.ArraysCache(2) for _ in model.layers])
    with pytest.raises(ModelError, match="ArraysCache at layer 0, not a KV cache"):
        measure_shape(SYNTHETIC["llama"], "float16")


def test_an_unknown_architecture_is_a_model_error():
    with pytest.raises(ModelError, match="has no architecture 'no-such-arch'"):
        measure_shape({**SYNTHETIC["llama"], "model_type": "no-such-arch"}, "float16")


def test_uniform_shapes_keep_their_old_arithmetic():
    shape = ModelShape(4, 100, 10, 20, 3, 50)
    assert shape.shard_bytes(0, 3) == (4 * 100 + 10 + 20, 4 * 3 * 50)
    assert shape.shard_bytes(1, 2, 7) == (200, 2 * 3 * 7)
    mixed = ModelShape(3, 0, 10, 20, 0, 50, layer_sizes=(1, 2, 3), kv_per_token=(4, 5, 6),
                       kv_window=(0, 8, 0), tied_bytes=10)
    assert mixed.shard_bytes(0, 2, 100) == (1 + 2 + 3 + 10 + 20 - 10, 400 + 40 + 600)
    assert mixed.shard_bytes(1, 2, 100) == (2 + 3 + 20, 40 + 600)
    with pytest.raises(ValueError, match="2 entries for 3 layers"):
        ModelShape(3, 0, 0, 0, 0, 1, layer_sizes=(1, 2))


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_multiply_adds_match_the_llama_formula_and_ignore_quantization(name):
    from node.plan import model_shape

    config = SYNTHETIC[name]
    measured = measure_shape(config, "float32")
    formula = model_shape(config, "float32")
    assert measured.layer_macs == formula.layer_macs  # q, k, v, o and the three MLP matrices
    assert measured.head_macs == config["vocab_size"] * config["hidden_size"]
    # a quantized matrix packs several weights a word: still one multiply-add each
    quantized = measure_shape({**config, "quantization": Q4}, "float16")
    assert quantized.layer_macs == measured.layer_macs
    assert quantized.head_macs == measured.head_macs
    assert measured.stage_macs(0, 1) == 2 * measured.layer_macs[0]
    last = measured.n_layers - 1
    assert measured.stage_macs(last, last) == measured.layer_macs[-1] + measured.head_macs


def test_a_token_pays_only_for_the_experts_it_uses():
    config = SYNTHETIC["qwen3_moe"]  # 4 experts, 2 per token
    every = measure_shape({**config, "num_experts_per_tok": config["num_experts"]}, "float32")
    top = measure_shape(config, "float32")
    # gate, up and down of each expert: hidden x moe_intermediate each; 2 of 4 skipped
    skipped = 3 * config["hidden_size"] * config["moe_intermediate_size"] * 2
    assert every.layer_macs[0] - top.layer_macs[0] == skipped
