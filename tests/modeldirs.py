"""Real model directories on disk, for tiny random-weight mlx-lm models.

`write_model_dir` writes a directory as people have them: either what `mlx_lm.convert`
writes ("mlx": mlx-lm parameter names, optionally quantized, `quantization` in config.json)
or a Hugging Face checkpoint ("hf": HF tensor names and shapes, which mlx-lm's `sanitize`
turns into its own). Both get a byte-level `tokenizers` tokenizer that fits the 260-token
vocabulary of `node.synthetic`'s tiny configs: byte i is token i, then `<s>` (256, BOS,
added by `encode`), `</s>` (257, EOS) and `<pad>` (258).

`reference_tokens` is the single-process reference: `mlx_lm.load` plus greedy
`generate_step`, nothing from node/. `write_broken_dir` writes directories a loader must
refuse. Everything works offline.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

BOS, EOS, PAD = 256, 257, 258
SPECIAL_TOKENS = ("<s>", "</s>", "<pad>")  # ids 256, 257, 258

# the same role tags as node.models.ByteTokenizer's chat encoding
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# config.json "architectures" of the HF checkpoints (used unless the config names one)
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "mamba": "MambaForCausalLM",
}

# architectures whose HF checkpoints store experts one by one
# (model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight) and whose mlx-lm sanitize
# stacks them into mlp.switch_mlp.{gate,up,down}_proj.weight
_PER_EXPERT_HF = {"qwen3_moe", "qwen2_moe"}

# a tiny mamba: recurrent state (ArraysCache), no per-layer KV cache, and its layers are
# model.backbone.layers, not model.model.layers
RECURRENT_CONFIG: dict[str, Any] = dict(
    model_type="mamba", architectures=["MambaForCausalLM"], vocab_size=260, hidden_size=96,
    intermediate_size=192, state_size=8, num_hidden_layers=4, conv_kernel=4, use_bias=False,
    use_conv_bias=True, time_step_rank=6, tie_word_embeddings=True, layer_norm_epsilon=1e-5,
)

BROKEN_KINDS = ("bad-json", "no-model-type", "unknown-arch", "recurrent")


def write_model_dir(path: Path, config: dict, *, layout: str = "mlx", bits: int = 0,
                    group_size: int = 64, shards: int = 1, seed: int = 0) -> Path:
    """Write a loadable model directory for `config` with random weights from `seed`.

    layout "mlx" is what `mlx_lm.convert` writes (quantized when `bits` is 4 or 8, at
    `group_size`; layers whose input width `group_size` does not divide stay float, as
    convert leaves them); layout "hf" is an unquantized HF safetensors checkpoint.
    `shards` > 1 splits the tensors over that many `model-0000k-of-0000n.safetensors`
    files, by size and in checkpoint order, so a layer may straddle two files.
    The same `seed` gives the same float weights in both layouts. `path` must be new or
    empty: mlx-lm loads every `model*.safetensors` it finds, listed in the index or not.
    """
    from mlx_lm.utils import (
        _get_classes,
        get_total_parameters,
        quantize_model,
        save_config,
        save_model,
    )

    if layout not in ("mlx", "hf"):
        raise ValueError(f"layout must be 'mlx' or 'hf', not {layout!r}")
    if bits and layout != "mlx":
        raise ValueError("only the mlx layout is quantized")
    if shards < 1:
        raise ValueError("shards must be >= 1")
    path = Path(path)
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(f"{path} is not empty")  # stale shards would be globbed too
    path.mkdir(parents=True, exist_ok=True)

    hf_config = _hf_config(config)
    model_class, args_class = _get_classes(hf_config)
    model = model_class(args_class.from_dict(hf_config))
    _randomize(model, seed, hf_config["model_type"])
    hf_weights = _to_hf(model, hf_config)

    if layout == "hf":
        _write_weights(path, hf_weights, shards, fmt="pt", total_parameters=None)
        _write_json(path / "config.json", hf_config)
    else:
        # the steps of mlx_lm.convert: load (sanitize + load_weights), quantize, save
        weights = model.sanitize(dict(hf_weights)) if hasattr(model, "sanitize") else hf_weights
        model.load_weights(list(weights.items()), strict=True)
        mlx_config = dict(hf_config)
        if bits:
            with contextlib.redirect_stdout(io.StringIO()):  # it prints bits per weight
                model, mlx_config = quantize_model(
                    model, mlx_config, group_size, bits,
                    quant_predicate=_fitting_predicate(model, group_size))
        if shards == 1:
            save_model(path, model)  # model.safetensors + index, exactly as convert
        else:  # save_model shards at 5 GB only; same names, format and index
            _write_weights(path, dict(tree_flatten(model.parameters())), shards, fmt="mlx",
                           total_parameters=get_total_parameters(model))
        save_config(mlx_config, path / "config.json")
    _write_json(path / "generation_config.json",
                {"bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": PAD})
    write_tokenizer(path, hf_config.get("max_position_embeddings", 2048))
    return path


def reference_tokens(path: Path, prompt_ids: list[int], n: int) -> list[int]:
    """The `n` greedy tokens mlx-lm alone generates after `prompt_ids` (no stop at EOS)."""
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    model, _ = load(str(path))
    prompt = mx.array(prompt_ids, dtype=mx.uint32)
    steps = generate_step(prompt, model, max_tokens=n, sampler=lambda lp: mx.argmax(lp, -1))
    return [int(token) for token, _ in steps]


def write_broken_dir(path: Path, kind: str) -> Path:
    """A directory a loader must refuse; `kind` is one of BROKEN_KINDS.

    All have real weights and a tokenizer, so only the named thing is wrong: "bad-json"
    (config.json is not JSON), "no-model-type", "unknown-arch" (model_type
    "no_such_arch"), "recurrent" (a tiny mamba: per-layer recurrent state, no KV cache).
    """
    if kind not in BROKEN_KINDS:
        raise ValueError(f"kind must be one of {BROKEN_KINDS}, not {kind!r}")
    if kind == "recurrent":
        return write_model_dir(path, RECURRENT_CONFIG)
    path = write_model_dir(path, _BROKEN_BASE)
    config = json.loads((path / "config.json").read_text())
    if kind == "bad-json":
        (path / "config.json").write_text('{"model_type": "llama", "hidden_size": 96,\n')
        return path
    if kind == "no-model-type":
        del config["model_type"]
    else:
        config["model_type"] = "no_such_arch"
        config["architectures"] = ["NoSuchArchForCausalLM"]
    _write_json(path / "config.json", config)
    return path


# a tiny llama, the base of the broken directories
_BROKEN_BASE: dict[str, Any] = dict(
    model_type="llama", hidden_size=96, num_hidden_layers=2, intermediate_size=192,
    num_attention_heads=6, num_key_value_heads=6, vocab_size=260, max_position_embeddings=2048,
    rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
)


def write_tokenizer(path: Path, max_length: int = 2048) -> None:
    """The byte-level tokenizer files: tokenizer.json, tokenizer_config.json and map."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    # a byte-level BPE with no merges: the ByteLevel pre-tokenizer maps byte i to the
    # printable stand-in character _byte_chars()[i], whose id is i
    vocab = {char: i for i, char in enumerate(_byte_chars())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()  # mlx-lm picks its BPEStreamingDetokenizer for this
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in SPECIAL_TOKENS])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS)])
    tok.save(str(path / "tokenizer.json"))
    bos, eos, pad = SPECIAL_TOKENS
    _write_json(path / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos, "eos_token": eos, "pad_token": pad,
        "add_bos_token": True, "add_eos_token": False,
        "clean_up_tokenization_spaces": False, "model_max_length": max_length,
        "chat_template": CHAT_TEMPLATE,
    })
    _write_json(path / "special_tokens_map.json",
                {"bos_token": bos, "eos_token": eos, "pad_token": pad})


def _byte_chars() -> list[str]:
    """GPT-2's bytes_to_unicode: the character the ByteLevel pre-tokenizer gives byte i."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def _hf_config(config: dict) -> dict[str, Any]:
    """config.json of the checkpoint: the mlx-lm config plus the HF bookkeeping keys."""
    out = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    if not out.get("architectures"):
        model_type = out["model_type"]
        name = ARCHITECTURES.get(model_type)
        if name is None:
            name = "".join(p.title() for p in model_type.split("_")) + "ForCausalLM"
        out["architectures"] = [name]
    out.setdefault("torch_dtype", "float32")
    out.setdefault("bos_token_id", BOS)
    out.setdefault("eos_token_id", EOS)
    out.setdefault("pad_token_id", PAD)
    return out


def _randomize(model: nn.Module, seed: int, model_type: str) -> None:
    """Every parameter from `seed`, in float32: norms ones, other 1-D params (biases)
    U(-0.5, 0.5), matrices uniform with variance gain**2 / fan_in.

    node.models._randomize's convention (reimplemented: nothing here uses node/), plus a
    gain and random biases so that greedy decoding does not settle on one token: at gain 1
    the tiny qwen2/qwen3 repeat one token. Gemma's residual already carries the embedding
    times sqrt(hidden) and (1 + w) norms, so it takes gain 1 and half that for embeddings.
    """
    gemma = model_type.startswith("gemma")
    params = sorted(tree_flatten(model.parameters()))
    keys = mx.random.split(mx.random.key(seed), len(params))
    new = []
    for (name, p), k in zip(params, keys):
        if "norm" in name:
            value = mx.ones(p.shape)
        elif p.ndim == 1:
            value = mx.random.uniform(-0.5, 0.5, p.shape, key=k)
        else:
            gain = (0.5 if "embed" in name else 1.0) if gemma else 2.0
            bound = gain * math.sqrt(3.0 / p.shape[-1])
            value = mx.random.uniform(-bound, bound, p.shape, key=k)
        new.append((name, value.astype(mx.float32)))
    model.update(tree_unflatten(new))
    mx.eval(model.parameters())


def _fitting_predicate(model: nn.Module, group_size: int) -> Any:
    """The model's own quant_predicate, except that a per-layer group size which does not
    divide the layer's input width becomes `group_size` (qwen3_moe asks 8 bits at group 64
    for its router, whose input is the tiny hidden size 96; convert would fail there)."""
    own = getattr(model, "quant_predicate", None)
    if own is None:
        return None

    def predicate(path: str, module: nn.Module) -> bool | dict:
        params = own(path, module)
        if isinstance(params, dict) and module.weight.shape[-1] % params["group_size"]:
            params = {**params, "group_size": group_size}
        return params

    return predicate


def _to_hf(model: nn.Module, config: dict) -> dict[str, mx.array]:
    """The model's weights as the HF checkpoint stores them (what `sanitize` undoes)."""
    model_type = config["model_type"]
    tied = config.get("tie_word_embeddings", False)
    out: dict[str, mx.array] = {}
    for name, value in tree_flatten(model.parameters()):
        if name == "lm_head.weight" and tied:
            continue  # tied checkpoints have no head (gemma3_text's Model still makes one)
        if ".switch_mlp." in name:
            if model_type not in _PER_EXPERT_HF:
                raise ValueError(f"no HF expert layout known for {model_type}")
            prefix, proj = name.split(".switch_mlp.")
            for e in range(value.shape[0]):
                out[f"{prefix}.experts.{e}.{proj}"] = value[e]
            continue
        if model_type == "mamba" and name.endswith("conv1d.weight"):
            value = value.moveaxis(2, 1)  # HF Conv1d: (channels, 1, kernel)
        out[name] = value
    mx.eval(out)
    return out


def _write_weights(path: Path, weights: dict[str, mx.array], shards: int, *, fmt: str,
                   total_parameters: int | None) -> None:
    """The safetensors files and model.safetensors.index.json, as save_model names them."""
    names = list(weights)
    if len(names) < shards:
        raise ValueError(f"{len(names)} tensors cannot fill {shards} shards")
    groups = _split(names, [weights[n].nbytes for n in names], shards)
    metadata: dict[str, Any] = {"total_size": sum(v.nbytes for v in weights.values())}
    if total_parameters is not None:
        metadata["total_parameters"] = total_parameters
    weight_map: dict[str, str] = {}
    for i, group in enumerate(groups):
        file = (f"model-{i + 1:05d}-of-{shards:05d}.safetensors" if shards > 1
                else "model.safetensors")
        mx.save_safetensors(str(path / file), {n: weights[n] for n in group},
                            metadata={"format": fmt})
        weight_map.update(dict.fromkeys(group, file))
    if shards > 1 or fmt == "mlx":  # a single-file HF checkpoint has no index
        _write_json(path / "model.safetensors.index.json",
                    {"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))})


def _split(names: list[str], sizes: list[int], shards: int) -> list[list[str]]:
    """`shards` non-empty runs of `names` of about equal byte size, in order."""
    target = sum(sizes) / shards
    groups: list[list[str]] = [[]]
    done = 0
    for i, (name, size) in enumerate(zip(names, sizes)):
        must_cut = len(names) - i <= shards - len(groups)  # one tensor left per shard
        if groups[-1] and len(groups) < shards and (must_cut or done >= len(groups) * target):
            groups.append([])
        groups[-1].append(name)
        done += size
    return groups


def _write_json(path: Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n")
