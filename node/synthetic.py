"""Configs of the `synthetic:<name>` models: mlx-lm architectures with random weights.

Each entry is a config.json as mlx-lm reads it (`model_type` picks mlx-lm's own
`ModelArgs` and `Model` classes). The tiny ones run the test suite offline: their heads,
KV heads and MLP columns divide by 2 and 3, so tensor parallel splits them 2 and 3 ways,
and their vocabulary is the byte tokenizer's (256 bytes + BOS/EOS/PAD + 1 spare). The
large ones have the shapes of the real models they are named after, for benchmarks.
"""

from __future__ import annotations

from typing import Any

BYTE_VOCAB = 260

_TINY: dict[str, Any] = dict(
    hidden_size=96, num_hidden_layers=8, intermediate_size=192, num_attention_heads=6,
    num_key_value_heads=6, vocab_size=BYTE_VOCAB, max_position_embeddings=2048,
    rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
)

SYNTHETIC: dict[str, dict[str, Any]] = {
    # tiny shapes, one per architecture (tests)
    "tiny": {**_TINY, "model_type": "llama"},
    "llama": {**_TINY, "model_type": "llama"},
    "mistral": {**_TINY, "model_type": "mistral"},
    "qwen2": {**_TINY, "model_type": "qwen2", "tie_word_embeddings": True},
    "qwen3": {**_TINY, "model_type": "qwen3", "head_dim": 16, "tie_word_embeddings": True},
    "qwen3_moe": {**_TINY, "model_type": "qwen3_moe", "head_dim": 16, "num_experts": 4,
                  "num_experts_per_tok": 2, "moe_intermediate_size": 48,
                  "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True},
    "gemma2": {**_TINY, "model_type": "gemma2", "head_dim": 16, "query_pre_attn_scalar": 16,
               "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
               "tie_word_embeddings": True},
    "gemma3_text": {**_TINY, "model_type": "gemma3_text", "head_dim": 16,
                    "query_pre_attn_scalar": 16, "sliding_window": 8,
                    "sliding_window_pattern": 3, "tie_word_embeddings": True},
    "phi3": {**_TINY, "model_type": "phi3"},
    # realistic shapes (benchmarks; --layers shortens them)
    "llama-7b": dict(model_type="llama", hidden_size=4096, num_hidden_layers=32,
                     intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                     vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
                     rope_theta=10000.0, tie_word_embeddings=False),
    "llama-13b": dict(model_type="llama", hidden_size=5120, num_hidden_layers=40,
                      intermediate_size=13824, num_attention_heads=40, num_key_value_heads=40,
                      vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
                      rope_theta=10000.0, tie_word_embeddings=False),
    "qwen3-8b": dict(model_type="qwen3", hidden_size=4096, num_hidden_layers=36,
                     intermediate_size=12288, num_attention_heads=32, num_key_value_heads=8,
                     head_dim=128, vocab_size=151936, max_position_embeddings=40960,
                     rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=False),
    "qwen3-1.7b": dict(model_type="qwen3", hidden_size=2048, num_hidden_layers=28,
                       intermediate_size=6144, num_attention_heads=16, num_key_value_heads=8,
                       head_dim=128, vocab_size=151936, max_position_embeddings=40960,
                       rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True),
    "qwen3-30b-a3b": dict(model_type="qwen3_moe", hidden_size=2048, num_hidden_layers=48,
                          intermediate_size=6144, num_attention_heads=32,
                          num_key_value_heads=4, head_dim=128, vocab_size=151936,
                          max_position_embeddings=40960, rms_norm_eps=1e-6,
                          rope_theta=1000000.0, tie_word_embeddings=False, num_experts=128,
                          num_experts_per_tok=8, moe_intermediate_size=768,
                          decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True),
    "gemma3-4b": dict(model_type="gemma3_text", hidden_size=2560, num_hidden_layers=34,
                      intermediate_size=10240, num_attention_heads=8, num_key_value_heads=4,
                      head_dim=256, vocab_size=262208, max_position_embeddings=131072,
                      rms_norm_eps=1e-6, rope_theta=1000000.0, query_pre_attn_scalar=256,
                      sliding_window=1024, sliding_window_pattern=6,
                      tie_word_embeddings=True),
}

TINY_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "gemma2", "gemma3_text",
              "phi3")


def describe(name: str) -> str:
    """One line for `mlx-cluster models`: architecture and shape."""
    c = SYNTHETIC[name]
    parts = [c["model_type"], f"{c['num_hidden_layers']} layers", f"hidden {c['hidden_size']}",
             f"{c['num_attention_heads']}/{c.get('num_key_value_heads', c['num_attention_heads'])}"
             " heads"]
    if c.get("num_experts"):
        parts.append(f"{c['num_experts']} experts (top {c['num_experts_per_tok']})")
    if c.get("sliding_window"):
        parts.append(f"sliding window {c['sliding_window']}")
    parts.append(f"vocab {c['vocab_size']}")
    if c.get("tie_word_embeddings"):
        parts.append("tied head")
    return ", ".join(parts)
