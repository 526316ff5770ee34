"""A layer range of an mlx-lm model through the model's own forward (node/shardrun.py),
in one process: exact against the whole model, or refused with the reason."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm.models.cache import make_prompt_cache

from node.errors import ModelError
from node.models import ModelSource, _synthetic_model, load_shard

TINY = dict(hidden_size=64, num_hidden_layers=6, intermediate_size=128, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=260, max_position_embeddings=2048,
            rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, head_dim=16)
SPLITS = ([(0, 1), (2, 5)], [(0, 2), (3, 3), (4, 5)], [(0, 0), (1, 4), (5, 5)])


def source(**config) -> ModelSource:
    return ModelSource("synthetic:test", "synthetic", {**TINY, **config}, dtype="float32")


def split_logits(src: ModelSource, splits: list[tuple[int, int]], prompt: list[int],
                 steps: list[int]) -> list[mx.array]:
    shards = [load_shard(src, a, b) for a, b in splits]
    caches = [s.runner.make_cache() for s in shards]
    out = []
    for x in [mx.array([prompt]), *(mx.array([[t]]) for t in steps)]:
        for s, c in zip(shards, caches):
            n = x.shape[1]
            x = s.runner.forward(x, c, pick=mx.array([n - 1]) if s.is_last else None)
        out.append(x[:, 0])
    return out


@pytest.mark.parametrize("splits", SPLITS)
def test_a_model_that_reads_any_cache_slot_offset_splits_exactly(splits):
    """ministral3 scales attention by cache[0].offset; layer 0 is sliding and a later shard
    holds only full-attention layers, so its slot 0 is a spare that must know the offset."""
    src = source(model_type="ministral3", sliding_window=4,
                 layer_types=["sliding_attention"] + ["full_attention"] * 5,
                 rope_parameters={"rope_theta": 10000.0, "llama_4_scaling_beta": 0.5,
                                  "original_max_position_embeddings": 4,
                                  "rope_type": "default"})
    whole = _synthetic_model(src, 0, 5)
    cache = make_prompt_cache(whole)
    prompt, steps = list(range(5, 18)), [7, 9, 11, 13, 15, 17, 19]
    want = [whole(mx.array([prompt]), cache=cache)[:, -1]]
    want += [whole(mx.array([[t]]), cache=cache)[:, -1] for t in steps]
    got = split_logits(src, splits, prompt, steps)
    assert max(mx.abs(a - b).max().item() for a, b in zip(want, got)) < 1e-5


def test_layers_that_hand_each_other_more_than_the_hidden_state_are_refused_at_load():
    """hunyuan's cross-layer attention passes a shared K/V from layer to layer: a shard
    of it would fail every request, so it is refused when it loads, with the reason."""
    src = source(model_type="hunyuan", attention_bias=False, moe_topk=1, num_experts=1,
                 num_shared_expert=1, use_mixed_mlp_moe=False, use_qk_norm=True, use_cla=True,
                 cla_share_factor=2, rope_scaling={"alpha": 1.0, "factor": 1.0,
                                                   "type": "dynamic"})
    with pytest.raises(ModelError, match="cannot run layers 2-5 on their own"):
        load_shard(src, 2, 5)
    assert load_shard(src, 0, 5).runner is not None  # the whole model on one node runs


def test_caches_that_are_not_one_per_layer_are_refused():
    with pytest.raises(ModelError, match="keeps 12 caches for its 6 layers"):
        load_shard(source(model_type="nanbeige", num_loops=2), 0, 2)


def test_a_tied_model_evaluates_the_embedding_on_the_last_shard_and_no_unused_head():
    """gemma3 builds an lm_head it never uses when tied: the last shard reads the embedding
    (its head) and not that matrix; a middle shard reads neither."""
    from mlx.utils import tree_flatten

    src = source(model_type="gemma3_text", query_pre_attn_scalar=16, sliding_window=8,
                 sliding_window_pattern=3, tie_word_embeddings=True)
    last, middle = load_shard(src, 3, 5), load_shard(src, 2, 3)
    model = last.model
    used = {id(p) for p in last.runner.parameters_used()}
    assert id(model.model.embed_tokens.weight) in used
    head = [p for n, p in tree_flatten(model.parameters()) if n.startswith("lm_head")]
    assert all(id(p) not in used for p in head)
    layers = sum(p.nbytes for layer in middle.layers for _, p in tree_flatten(layer.parameters()))
    assert middle.weight_bytes == layers
