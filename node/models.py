"""Model specs and loading one shard (a contiguous layer range) of a model.

Specs: `smollm2-135m` (the bundled real model), `synthetic:<name>` (an mlx-lm
architecture with random weights made deterministically from (seed, layer index), so a
node makes only its own layers; see node/synthetic.py), a local directory in MLX or HF
safetensors layout, or a hub id (each node downloads only the files of its layers, and
only when online). Every model is built by mlx-lm's own classes; a shard keeps the whole
model object and runs its own forward over its layer range (node/shardrun.py).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node.errors import ModelCodeError, ModelError, NodeError
from node.hub import LAYER_KEY, fetch_layer_files
from node.memory import settle_random_key
from node.plan import ModelShape
from node.sizes import build_model, measure_shape, mlx_lm_version
from node.synthetic import SYNTHETIC, describe
from node.tokenizers import ByteTokenizer, PromptTokenizer, prompt_tokenizer
from node.wire import DTYPES

log = logging.getLogger(__name__)

BUNDLED = "smollm2-135m"
SYNTHETIC_PREFIX = "synthetic:"
SYNTHETIC_SEED = 0



def known_specs() -> list[str]:
    return [BUNDLED, *(SYNTHETIC_PREFIX + n for n in SYNTHETIC), "<local dir>", "<hub id>"]


def spec_lines() -> list[tuple[str, str]]:
    """(spec, what it is) for every model spec, for `mlx-cluster models`."""
    return [(BUNDLED, "SmolLM2-135M-Instruct, the bundled real model (llama, 30 layers)"),
            *((SYNTHETIC_PREFIX + n, describe(n) + ", random weights") for n in SYNTHETIC),
            ("<local dir>", "an MLX-converted (quantized or not) or HF safetensors directory"),
            ("<hub id>", "a Hugging Face repo id; each node downloads its own layers (online)")]


def cache_root() -> Path:
    """Where converted models are cached (env MLX_CLUSTER_CACHE overrides)."""
    env = os.environ.get("MLX_CLUSTER_CACHE")
    if env:
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("mlx-cluster-console")) / "models"


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
        if name not in SYNTHETIC:
            raise ModelError(
                f"unknown synthetic model {name!r}; choose one of "
                + ", ".join(SYNTHETIC_PREFIX + n for n in SYNTHETIC)
                + " (`mlx-cluster models` describes them)"
            )
        config = dict(SYNTHETIC[name])
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
    config = read_config(path)
    check_architecture(config, spec)
    if not form:
        form = f"q{config['quantization']['bits']}" if "quantization" in config else ""
    return ModelSource(spec, kind, config, path=path, form=form, dtype=dtype)


def read_config(path: Path) -> dict:
    """A model directory's config.json, checked far enough that a node can build it."""
    cfg = path / "config.json"
    if not cfg.exists():
        raise ModelError(f"{path} has no config.json: not an MLX or HF model directory")
    try:
        config = json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{cfg} is not valid JSON ({e}); fix or replace the file") from e
    if not isinstance(config, dict) or not config.get("model_type"):
        raise ModelError(f"{cfg} names no model_type, so no mlx-lm architecture can build it; "
                         "is this a model directory?")
    text = config.get("text_config")
    if isinstance(text, dict):  # a multimodal wrapper: the text model's sizes count
        config = {**config, **{k: text[k] for k in (*LIFTED, "max_position_embeddings")
                               if k in text and k not in config}}
    missing = [k for k in LIFTED if k not in config]
    if missing:
        raise ModelError(f"{cfg} has no {' or '.join(missing)}: cannot plan its layers")
    return config


# what a plan, the wire checks and the tokenizer need from a config (multimodal wrappers
# keep them in text_config)
LIFTED = ("num_hidden_layers", "hidden_size", "vocab_size")


def check_architecture(config: dict, spec: str) -> None:
    """Refuse, before anything loads, a model this cluster cannot split by layers: an
    architecture mlx-lm lacks, one with no layer list, or one with recurrent state.
    Builds the model with mlx-lm's classes; its parameters stay lazy (no memory)."""
    from node.shardrun import cache_kinds, layer_list

    model = build_model(config, spec)
    n = len(layer_list(model))
    if n != int(config["num_hidden_layers"]):
        raise ModelError(f"{spec}: its config says {config['num_hidden_layers']} layers but "
                         f"mlx-lm's {config['model_type']} model has {n}")
    try:
        cache_kinds(model)
    except ModelError as e:
        raise ModelError(f"{spec}: {e}") from None


def _hub_source(repo: str, dtype: str) -> ModelSource:
    if os.environ.get("HF_HUB_OFFLINE"):
        raise ModelError(f"{repo!r} is not a local directory and HF_HUB_OFFLINE is set")
    try:
        from huggingface_hub import snapshot_download

        # config and tokenizer only: each node fetches the weight files of its own layers
        path = Path(snapshot_download(repo, allow_patterns=["*.json", "*.txt", "*.model",
                                                            "*.jinja"]))
    except Exception as e:  # network, auth, unknown repo: all the same to the user
        raise ModelError(f"could not download {repo!r} from the hub: {e}") from e
    return _dir_source(repo, "hub", path, dtype, "")


def shape_of(source: ModelSource) -> ModelShape:
    """Byte sizes of a resolved model's parts, for plans and budget checks."""
    dtype = source.dtype or _config_dtype(source.config, source.form)
    return measure_shape(source.config, dtype)


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
    model: Any  # the whole mlx-lm Model; only this shard's parameters are evaluated
    start: int
    end: int
    tokenizer: PromptTokenizer | None
    dtype: str
    weight_bytes: int
    load_seconds: float
    runner: Any = None  # node.shardrun.ShardModel (None for a tensor-parallel rank)
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
        return self.runner.kept_layers


def check_range(start: int, end: int, n_layers: int) -> None:
    if not (0 <= start <= end < n_layers):
        raise ModelError(
            f"layer range {start}-{end} is out of bounds: the model has {n_layers} layers "
            f"(valid ranges lie within 0-{n_layers - 1}, start <= end)"
        )


def load_shard(source: ModelSource, start: int, end: int) -> Shard:
    """Layers start..end of `source` (plus the embedding / head where needed), run through
    the model's own forward; only this shard's tensors are read or made."""
    steps = load_steps(source, start, end)
    while (shard := next(steps)) is None:
        pass
    return shard


STEP_BYTES = 16 * 2**20  # what one step of a load reads or makes (load_steps)


def load_steps(source: ModelSource, start: int, end: int) -> Iterator[Shard | None]:
    """`load_shard` in steps, each a short call on the MLX thread: None after each part,
    then the shard. A node that loads a new plan while the old one serves runs one step at
    a time, so that the old plan's forwards go on between them (node/service.py)."""
    import mlx.core as mx

    from node.shardrun import ShardModel

    check_range(start, end, source.n_layers)
    t0 = time.perf_counter()
    try:
        model, tokenizer = _model(source, start, end)
        runner = ShardModel(model, start, end, source.n_layers)
        used = runner.parameters_used()
        part: list = []
        for array in used:
            part.append(array)
            if sum(a.nbytes for a in part) >= STEP_BYTES:
                mx.eval(part)
                part = []
                yield None
        mx.eval(part)
        dtype = _dtype_of(runner.kept_layers[0])
        shard = Shard(source, model, start, end, tokenizer, dtype,
                      sum(a.nbytes for a in used), 0.0, runner)
    except NodeError:
        raise
    except Exception as e:  # mlx-lm's code, or a weight file that is short or corrupt
        raise ModelCodeError(
            f"{source.spec}: loading layers {start}-{end} failed in mlx-lm's "
            f"{source.config.get('model_type')} code ({type(e).__name__}: {e}); check that "
            f"the model directory is complete and that mlx-lm {mlx_lm_version()} supports "
            "it") from e
    try:
        runner.probe(shard.hidden_size, getattr(mx, dtype))
    except Exception as e:
        whole = start == 0 and end == source.n_layers - 1
        raise ModelError(
            f"{source.spec}: mlx-lm's {source.config.get('model_type')} model "
            + ("failed its first forward" if whole else
               f"cannot run layers {start}-{end} on their own (its layers hand each other "
               "more than the hidden state)")
            + f" ({type(e).__name__}: {e}); run it on one node"
            + ("" if whole else " or with --backend mlx-ring:tensor if mlx-lm shards it")
        ) from e
    shard.load_seconds = time.perf_counter() - t0
    yield shard


def load_tensor_shard(source: ModelSource, group: Any) -> Shard:
    """Every layer of `source`, split across an mx.distributed group by mlx-lm's own
    `model.shard(group)` (tensor parallel). Weights stay lazy until they are sharded, so a
    rank reads only its own slices from disk."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from node.shardrun import layer_list

    t0 = time.perf_counter()
    last = source.n_layers - 1
    model, tokenizer = _model(source, 0, last)
    if not hasattr(model, "shard"):
        raise ModelError(tensor_refusal(source))
    model.shard(group)
    mx.eval(model.parameters())
    weight_bytes = sum(a.nbytes for _, a in tree_flatten(model.parameters()))
    return Shard(source, model, 0, last, tokenizer, _dtype_of(layer_list(model)[0]),
                 weight_bytes, time.perf_counter() - t0)


def tensor_refusal(source: ModelSource) -> str:
    return (f"{source.spec}: mlx-lm's {source.config['model_type']} model has no shard(), so "
            "it cannot run tensor parallel; use --backend pipeline or mlx-ring:pipeline")


def supports_tensor(source: ModelSource) -> bool:
    """Whether mlx-lm implements tensor parallel (`shard()`) for this architecture."""
    from mlx_lm.utils import _get_classes

    model_class, _ = _get_classes(source.config)
    return hasattr(model_class, "shard")


def _dtype_of(layer: Any) -> str:
    """The dtype a layer computes in: that of its floating-point parameters."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    for _, p in tree_flatten(layer.parameters()):
        if mx.issubdtype(p.dtype, mx.floating):
            return str(p.dtype).removeprefix("mlx.core.")
    return "float32"


def _model(source: ModelSource, start: int, end: int) -> tuple[Any, PromptTokenizer | None]:
    if source.kind == "synthetic":
        return _synthetic_model(source, start, end), ByteTokenizer()
    return _dir_model(source, start, end)


def _dir_model(source: ModelSource, start: int, end: int) -> tuple[Any, PromptTokenizer]:
    """mlx-lm's own loader, lazily: tensors of other layers are never read (MLX loads a
    tensor when it is first evaluated). A hub model fetches its layers' files first."""
    import mlx.core as mx
    from mlx_lm.utils import load_model

    assert source.path is not None
    strict = True
    if source.kind == "hub":
        # other layers' files are not here (and never needed), so mlx-lm's check that every
        # weight is there would fail; the index placed every one of this shard's tensors
        # in a file it fetched (names it cannot place make it fetch them all)
        strict = not fetch_layer_files(source.spec, source.path, start, end, source.n_layers)
    try:
        model, _ = load_model(source.path, lazy=True, strict=strict)
        settle_random_key()  # node/memory.py: mlx-lm built it with random initial weights
        tokenizer = _tokenizer(source)
    except (FileNotFoundError, ValueError) as e:
        raise ModelError(f"cannot load model from {source.path}: {e}") from e
    if source.dtype:
        model.set_dtype(getattr(mx, source.dtype))
    return model, tokenizer


_TOKENIZERS: dict[tuple[str, float], PromptTokenizer] = {}


def _tokenizer(source: ModelSource) -> PromptTokenizer:
    """The model's tokenizer, read once per directory (and again if its tokenizer files
    change): reading it is half of a small shard's load, and a re-plan after a node is
    lost reloads every survivor."""
    assert source.path is not None
    files = [f.stat().st_mtime for f in source.path.glob("tokenizer*")]
    key = (str(source.path), max(files, default=0.0))
    if key not in _TOKENIZERS:
        _TOKENIZERS.clear()  # one model's at a time
        _TOKENIZERS[key] = prompt_tokenizer(source)
    return _TOKENIZERS[key]


def _synthetic_model(source: ModelSource, start: int, end: int) -> Any:
    """mlx-lm's own model for the config, random weights: layer i's come from key
    (seed, i) alone, so every node makes the same weights for the layers it holds."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from node.shardrun import layer_list

    model = build_model(source.config, source.spec)  # lazy: nothing is computed yet
    if source.config.get("tie_word_embeddings") and hasattr(model, "sanitize"):
        # some models settle their tying while sanitizing the weights they load (gemma3:
        # no lm_head.weight means a tied head); a synthetic model loads none
        model.sanitize({})
    dtype = getattr(mx, source.dtype)
    layers = layer_list(model)
    for i in range(start, end + 1):
        _randomize(layers[i], _layer_key(i), dtype)
    # outside the layers: the embedding (key -1) and the rest (norm, head: key -2)
    outside = [(n, p) for n, p in tree_flatten(model.parameters())
               if LAYER_KEY.search("." + n) is None]
    embed = [(n, p) for n, p in outside if "embed" in n]
    _randomize(model, _layer_key(-1), dtype, embed)
    _randomize(model, _layer_key(-2), dtype, [x for x in outside if "embed" not in x[0]])
    return model


def synthetic_full_model(spec: str, dtype: str = "", layers: int = 0) -> Any:
    """The whole synthetic model in one process (the single-process reference)."""
    source = resolve(spec, dtype, layers)
    return _synthetic_model(source, 0, source.n_layers - 1)


def _layer_key(index: int) -> Any:
    import mlx.core as mx

    return mx.random.key(SYNTHETIC_SEED * 1_000_003 + index + 16)


def _randomize(module: Any, key: Any, dtype: Any, params: list | None = None) -> None:
    """Random values for `params` (name, array) of `module` (default: all of them):
    uniform with the variance of N(0, 1/fan_in) for matrices, ones for norms and 1-D."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten

    params = sorted(tree_flatten(module.parameters()) if params is None else params,
                    key=lambda x: x[0])
    if not params:
        return
    keys = mx.random.split(key, len(params))
    new = []
    for (name, p), k in zip(params, keys):
        if "norm" in name or p.ndim == 1:
            value = mx.ones(p.shape)
        else:
            # uniform with the variance of N(0, 1/fan_in): ~3x cheaper to draw than normal
            bound = math.sqrt(3.0 / p.shape[-1])
            value = mx.random.uniform(-bound, bound, p.shape, key=k)
        new.append((name, value.astype(dtype)))
    module.update(tree_unflatten(new), strict=False)
