"""Model specs and loading one shard (a contiguous layer range) of a model.

Specs: `smollm2-135m` (the bundled real model), `synthetic:tiny|llama-7b|llama-13b`
(random llama weights made deterministically from (seed, layer index), so a node makes
only its own layers), a local directory in MLX/HF layout, or a hub id (downloaded
only when online). Every model runs through mlx-lm's own model classes; a shard keeps
the mlx-lm model object with `model.model.layers` cut down to its own range.
"""

from __future__ import annotations

import codecs
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from node.errors import ModelError
from node.plan import ModelShape, model_shape

BUNDLED = "smollm2-135m"
SYNTHETIC_PREFIX = "synthetic:"
SYNTHETIC_SEED = 0

# llama shapes; vocab 260 for tiny = 256 bytes + BOS/EOS/PAD (+1 spare)
SYNTHETIC_SHAPES: dict[str, dict[str, Any]] = {
    # heads, KV heads and MLP columns divide by 2 and 3: tensor parallel on 2 or 3 nodes
    "tiny": dict(hidden_size=96, num_hidden_layers=8, intermediate_size=192,
                 num_attention_heads=6, num_key_value_heads=6, vocab_size=260,
                 max_position_embeddings=2048),
    "llama-7b": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=11008,
                     num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                     max_position_embeddings=4096),
    "llama-13b": dict(hidden_size=5120, num_hidden_layers=40, intermediate_size=13824,
                      num_attention_heads=40, num_key_value_heads=40, vocab_size=32000,
                      max_position_embeddings=4096),
}
DTYPES = ("float32", "float16", "bfloat16")


def known_specs() -> list[str]:
    return [BUNDLED, *(SYNTHETIC_PREFIX + n for n in SYNTHETIC_SHAPES), "<local dir>"]


def cache_root() -> Path:
    """Where converted models are cached (env MLX_CLUSTER_CACHE overrides)."""
    env = os.environ.get("MLX_CLUSTER_CACHE")
    if env:
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("mlx-cluster-console")) / "models"


# ------------------------------------------------------------------ tokenizers


class Detokenizer(Protocol):
    def add_token(self, token: int) -> None: ...
    def finalize(self) -> None: ...
    @property
    def last_segment(self) -> str: ...


class PromptTokenizer(Protocol):
    eos_ids: set[int]

    def encode(self, text: str, chat: bool) -> list[int]: ...
    def encode_messages(self, messages: list[dict]) -> list[int]: ...
    def detokenizer(self) -> Detokenizer: ...


class ByteDetokenizer:
    """Streams UTF-8 text out of byte tokens, holding back partial characters."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""

    def add_token(self, token: int) -> None:
        if token < 256:
            self._pending += self._decoder.decode(bytes([token]))

    def finalize(self) -> None:
        self._pending += self._decoder.decode(b"", final=True)

    @property
    def last_segment(self) -> str:
        out, self._pending = self._pending, ""
        return out


class ByteTokenizer:
    """The synthetic models' tokenizer: one token per UTF-8 byte, plus BOS/EOS/PAD.

    Hand-written because it is four lines of logic; a `tokenizers` BPE would need a
    vocabulary file for no gain on random-weight models.
    """

    BOS, EOS, PAD = 256, 257, 258

    def __init__(self) -> None:
        self.eos_ids = {self.EOS}

    def encode(self, text: str, chat: bool) -> list[int]:
        if chat:
            text = f"<|user|>\n{text}\n<|assistant|>\n"
        return [self.BOS, *text.encode("utf-8")]

    def encode_messages(self, messages: list[dict]) -> list[int]:
        """A conversation in the same tags `encode(text, chat=True)` uses for one turn."""
        text = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages)
        return [self.BOS, *f"{text}<|assistant|>\n".encode()]

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def detokenizer(self) -> ByteDetokenizer:
        return ByteDetokenizer()


class MlxLmTokenizer:
    """mlx-lm's TokenizerWrapper behind the small interface the pipeline uses."""

    def __init__(self, wrapper: Any) -> None:
        self._tok = wrapper
        self.eos_ids = set(wrapper.eos_token_ids)

    def encode(self, text: str, chat: bool) -> list[int]:
        if chat and getattr(self._tok, "chat_template", None):
            ids = self._tok.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True
            )
            return list(ids)
        bos = self._tok.bos_token
        # as mlx_lm.generate does: add BOS unless the text already starts with it
        add_bos = bos is None or not text.startswith(bos)
        return list(self._tok.encode(text, add_special_tokens=add_bos))

    def encode_messages(self, messages: list[dict]) -> list[int]:
        """A conversation through the model's chat template, ready for the reply."""
        if getattr(self._tok, "chat_template", None):
            return list(self._tok.apply_chat_template(messages, add_generation_prompt=True))
        return self.encode("\n".join(m["content"] for m in messages), chat=False)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)

    def detokenizer(self) -> Detokenizer:
        return self._tok.detokenizer


def prompt_tokenizer(source: ModelSource) -> PromptTokenizer:
    """The tokenizer of a resolved model, without loading any weights."""
    if source.kind == "synthetic":
        return ByteTokenizer()
    from mlx_lm.utils import load_tokenizer

    return MlxLmTokenizer(load_tokenizer(source.path))


# ------------------------------------------------------------------ specs


@dataclass(frozen=True)
class ModelSource:
    """Where a spec's weights come from and the config they are built with."""

    spec: str
    kind: str  # "bundled" | "synthetic" | "local" | "hub"
    config: dict
    path: Path | None = None
    form: str = ""
    dtype: str = "float32"

    @property
    def n_layers(self) -> int:
        return int(self.config["num_hidden_layers"])

    @property
    def context_length(self) -> int:
        return int(self.config.get("max_position_embeddings") or 4096)


def default_dtype() -> str:
    """fp32 on the CPU (the only dtype BLAS accelerates there), fp16 on a GPU."""
    import mlx.core as mx

    return "float32" if mx.default_device() == mx.cpu else "float16"


def resolve(spec: str, dtype: str = "", layers: int = 0) -> ModelSource:
    """Turn a spec string (+ overrides) into a ModelSource, converting once if needed."""
    if dtype and dtype not in DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if spec.startswith(SYNTHETIC_PREFIX):
        name = spec[len(SYNTHETIC_PREFIX):]
        if name not in SYNTHETIC_SHAPES:
            raise ModelError(
                f"unknown synthetic model {name!r}; choose one of "
                + ", ".join(SYNTHETIC_PREFIX + n for n in SYNTHETIC_SHAPES)
            )
        config = {"model_type": "llama", "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
                  "tie_word_embeddings": False, **SYNTHETIC_SHAPES[name]}
        if layers:
            config["num_hidden_layers"] = layers
        return ModelSource(spec, "synthetic", config, dtype=dtype or default_dtype())
    if layers:
        raise ModelError("--layers only applies to synthetic:* models")
    if spec == BUNDLED:
        from node import smollm2

        form = smollm2.best_form()
        path = smollm2.ensure_converted(cache_root(), form)
        return _dir_source(spec, "bundled", path, dtype, form)
    path = Path(spec).expanduser()
    if path.is_dir():
        return _dir_source(spec, "local", path, dtype, "")
    if "/" in spec and not path.exists():
        return _hub_source(spec, dtype)
    raise ModelError(
        f"unknown model spec {spec!r}: use one of {', '.join(known_specs())} "
        "or a Hugging Face repo id (online only)"
    )


def _dir_source(spec: str, kind: str, path: Path, dtype: str, form: str) -> ModelSource:
    cfg = path / "config.json"
    if not cfg.exists():
        raise ModelError(f"{path} has no config.json: not an MLX/HF model directory")
    config = json.loads(cfg.read_text())
    if not form:
        form = f"q{config['quantization']['bits']}" if "quantization" in config else ""
    return ModelSource(spec, kind, config, path=path, form=form, dtype=dtype)


def _hub_source(repo: str, dtype: str) -> ModelSource:
    if os.environ.get("HF_HUB_OFFLINE"):
        raise ModelError(f"{repo!r} is not a local directory and HF_HUB_OFFLINE is set")
    try:
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(repo, allow_patterns=["*.json", "*.safetensors", "*.txt",
                                                            "*.model", "*.jinja"]))
    except Exception as e:  # network, auth, unknown repo: all the same to the user
        raise ModelError(f"could not download {repo!r} from the hub: {e}") from e
    return _dir_source(repo, "hub", path, dtype, "")


def shape_of(source: ModelSource) -> ModelShape:
    """Byte sizes of a resolved model's parts, for plans and budget checks."""
    quant = source.config.get("quantization") or {}
    dtype = source.dtype or _config_dtype(source.config, source.form)
    return model_shape(source.config, dtype, bits=int(quant.get("bits", 0)))


def _config_dtype(config: dict, form: str) -> str:
    if form == "f32":
        return "float32"
    named = str(config.get("torch_dtype") or config.get("dtype") or "float32")
    return named if named in DTYPES else "float32"


# ------------------------------------------------------------------ shards


@dataclass
class Shard:
    """One node's part of a model: layers start..end (inclusive) of an mlx-lm model."""

    source: ModelSource
    model: Any  # mlx-lm Model with model.model.layers cut to this shard
    start: int
    end: int
    tokenizer: PromptTokenizer | None
    dtype: str
    weight_bytes: int
    load_seconds: float
    hidden_size: int = field(init=False)

    def __post_init__(self) -> None:
        self.hidden_size = int(self.source.config["hidden_size"])

    @property
    def n_layers(self) -> int:
        return self.source.n_layers

    @property
    def is_first(self) -> bool:
        return self.start == 0

    @property
    def is_last(self) -> bool:
        return self.end == self.n_layers - 1

    @property
    def layers(self) -> list:
        return self.model.model.layers


def check_range(start: int, end: int, n_layers: int) -> None:
    if not (0 <= start <= end < n_layers):
        raise ModelError(
            f"layer range {start}-{end} is out of bounds: the model has {n_layers} layers "
            f"(valid ranges lie within 0-{n_layers - 1}, start <= end)"
        )


def load_shard(source: ModelSource, start: int, end: int) -> Shard:
    """Build layers start..end of `source` (plus embedding / head where needed)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    check_range(start, end, source.n_layers)
    t0 = time.perf_counter()
    if source.kind == "synthetic":
        model = _synthetic_model(source, start, end)
        tokenizer: PromptTokenizer | None = ByteTokenizer()
    else:
        model, tokenizer = _dir_model(source, start, end)
    kept = _kept_parameters(model, start, end, source.n_layers)
    mx.eval(kept)
    weight_bytes = sum(a.nbytes for _, a in tree_flatten(kept))
    dtype = str(model.model.layers[0].input_layernorm.weight.dtype).removeprefix("mlx.core.")
    return Shard(source, model, start, end, tokenizer, dtype, weight_bytes,
                 time.perf_counter() - t0)


def load_tensor_shard(source: ModelSource, group: Any) -> Shard:
    """Every layer of `source`, split across an mx.distributed group by mlx-lm's own
    `model.shard(group)` (tensor parallel). Weights stay lazy until they are sharded, so a
    rank reads only its own slices from disk."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    t0 = time.perf_counter()
    last = source.n_layers - 1
    if source.kind == "synthetic":
        model = _synthetic_model(source, 0, last)
        tokenizer: PromptTokenizer | None = ByteTokenizer()
    else:
        model, tokenizer = _dir_model(source, 0, last)
    if not hasattr(model, "shard"):
        raise ModelError(f"{source.spec}: mlx-lm's {type(model).__module__} model has no "
                         "shard(); use --backend mlx-ring:pipeline")
    model.shard(group)
    mx.eval(model.parameters())
    weight_bytes = sum(a.nbytes for _, a in tree_flatten(model.parameters()))
    dtype = str(model.model.layers[0].input_layernorm.weight.dtype).removeprefix("mlx.core.")
    return Shard(source, model, 0, last, tokenizer, dtype, weight_bytes,
                 time.perf_counter() - t0)


def _kept_parameters(model: Any, start: int, end: int, n_layers: int) -> list:
    """Parameters this shard uses; everything else stays lazy and is never read."""
    inner = model.model
    kept: list = [layer.parameters() for layer in inner.layers]
    tied = getattr(model.args, "tie_word_embeddings", False)
    if start == 0 or (end == n_layers - 1 and tied):
        kept.append(inner.embed_tokens.parameters())
    if end == n_layers - 1:
        kept.append(inner.norm.parameters())
        if not tied:
            kept.append(model.lm_head.parameters())
    return kept


def _cut(model: Any, start: int, end: int) -> None:
    model.model.layers = model.model.layers[start:end + 1]


def _dir_model(source: ModelSource, start: int, end: int) -> tuple[Any, PromptTokenizer]:
    import mlx.core as mx
    from mlx_lm.utils import load_model

    assert source.path is not None
    try:
        model, _ = load_model(source.path, lazy=True)
        tokenizer = prompt_tokenizer(source)
    except (FileNotFoundError, ValueError) as e:
        raise ModelError(f"cannot load model from {source.path}: {e}") from e
    if not hasattr(model, "model") or not hasattr(model.model, "layers"):
        raise ModelError(f"{source.spec}: only llama-family models (model.model.layers) "
                         "can be split")
    _cut(model, start, end)
    if source.dtype:
        model.set_dtype(getattr(mx, source.dtype))
    return model, tokenizer


def _synthetic_model(source: ModelSource, start: int, end: int) -> Any:
    """A llama with random weights: layer i's come from key (seed, i) alone."""
    import mlx.core as mx
    from mlx_lm.models import llama

    args = llama.ModelArgs.from_dict(source.config)
    model = llama.Model(args)  # parameters are lazy: nothing is computed yet
    dtype = getattr(mx, source.dtype)
    n = source.n_layers
    for i in range(start, end + 1):
        _randomize(model.model.layers[i], _layer_key(i), dtype)
    if start == 0:
        _randomize(model.model.embed_tokens, _layer_key(-1), dtype)
    if end == n - 1:
        _randomize(model.model.norm, _layer_key(-2), dtype)
        _randomize(model.lm_head, _layer_key(-3), dtype)
    _cut(model, start, end)
    return model


def synthetic_full_model(spec: str, dtype: str = "", layers: int = 0) -> Any:
    """The whole synthetic model in one process (the single-process reference)."""
    source = resolve(spec, dtype, layers)
    return _synthetic_model(source, 0, source.n_layers - 1)


def _layer_key(index: int) -> Any:
    import mlx.core as mx

    return mx.random.key(SYNTHETIC_SEED * 1_000_003 + index + 16)


def _randomize(module: Any, key: Any, dtype: Any) -> None:
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten

    params = sorted(tree_flatten(module.parameters()))
    keys = mx.random.split(key, len(params))
    new = []
    for (name, p), k in zip(params, keys):
        if "norm" in name or name.endswith("layernorm.weight") or p.ndim == 1:
            value = mx.ones(p.shape)
        else:
            # uniform with the variance of N(0, 1/fan_in): ~3x cheaper to draw than normal
            bound = math.sqrt(3.0 / p.shape[-1])
            value = mx.random.uniform(-bound, bound, p.shape, key=k)
        new.append((name, value.astype(dtype)))
    module.update(tree_unflatten(new))
