"""tests/modeldirs.py writes directories that mlx-lm itself loads (fast, no processes)."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import pytest
from mlx_lm import load
from mlx_lm.models.cache import ArraysCache, KVCache, make_prompt_cache

from node.synthetic import SYNTHETIC
from tests.modeldirs import (
    BOS,
    BROKEN_KINDS,
    EOS,
    reference_tokens,
    write_broken_dir,
    write_model_dir,
)

PROMPT = [BOS, 104, 105]  # "<s>hi"

CASES = {
    "qwen3-mlx": ("qwen3", dict(layout="mlx")),
    "qwen3-q4": ("qwen3", dict(layout="mlx", bits=4, group_size=32, shards=3)),
    "qwen3_moe-hf": ("qwen3_moe", dict(layout="hf", shards=2)),
    "gemma3_text-hf": ("gemma3_text", dict(layout="hf")),
}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("modeldirs")
    return {name: write_model_dir(root / name, SYNTHETIC[arch], **kw)
            for name, (arch, kw) in CASES.items()}


def _tensor_names(path: Path) -> dict[str, str]:
    """tensor -> file, read from the safetensors files themselves."""
    files = sorted(path.glob("model*.safetensors"))
    return {name: f.name for f in files for name in mx.load(str(f))}


@pytest.mark.parametrize("name", CASES)
def test_mlx_lm_loads_and_generates(dirs: dict[str, Path], name: str) -> None:
    model, tokenizer = load(str(dirs[name]))
    assert tokenizer.encode("hi") == PROMPT
    assert tokenizer.eos_token_ids == {EOS}
    tokens = reference_tokens(dirs[name], PROMPT, 8)
    assert len(tokens) == 8 and len(set(tokens)) > 1, tokens
    assert all(0 <= t < 260 for t in tokens)


def test_tokenizer_round_trips_and_chats(dirs: dict[str, Path]) -> None:
    _, tokenizer = load(str(dirs["qwen3-mlx"]))
    text = "Hello, world!\n  tabs\tand ~"
    ids = tokenizer.encode(text)
    assert ids == [BOS, *text.encode()]
    assert tokenizer.decode(ids[1:]) == text
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}],
                                         add_generation_prompt=True)
    assert chat == [BOS, *b"<|user|>\nhi\n<|assistant|>\n"]


def test_sharded_dirs_have_an_index_of_several_files(dirs: dict[str, Path]) -> None:
    for name, n in (("qwen3-q4", 3), ("qwen3_moe-hf", 2)):
        path = dirs[name]
        index = json.loads((path / "model.safetensors.index.json").read_text())
        files = sorted(f.name for f in path.glob("model*.safetensors"))
        assert files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        assert index["weight_map"] == _tensor_names(path)
        last_layer = max(k for k in index["weight_map"] if k.startswith("model.layers.7."))
        embed = "model.embed_tokens.weight"
        assert index["weight_map"][embed] != index["weight_map"][last_layer]


def test_quantized_config_and_tensors(dirs: dict[str, Path]) -> None:
    path = dirs["qwen3-q4"]
    config = json.loads((path / "config.json").read_text())
    assert config["quantization"]["bits"] == 4 and config["quantization"]["group_size"] == 32
    assert config["quantization_config"] == config["quantization"]
    names = _tensor_names(path)
    assert "model.layers.0.self_attn.q_proj.scales" in names
    assert "model.embed_tokens.scales" in names


def test_hf_layouts_use_hf_names(dirs: dict[str, Path]) -> None:
    moe = _tensor_names(dirs["qwen3_moe-hf"])
    assert "model.layers.0.mlp.experts.3.down_proj.weight" in moe
    assert not any("switch_mlp" in k for k in moe)
    gemma = _tensor_names(dirs["gemma3_text-hf"])
    assert "lm_head.weight" not in gemma  # tied
    assert not (dirs["gemma3_text-hf"] / "model.safetensors.index.json").exists()
    config = json.loads((dirs["gemma3_text-hf"] / "config.json").read_text())
    assert config["architectures"] == ["Gemma3ForCausalLM"]
    assert config["torch_dtype"] == "float32"


def test_layouts_hold_the_same_weights(tmp_path: Path) -> None:
    mlx_dir = write_model_dir(tmp_path / "mlx", SYNTHETIC["qwen3_moe"], layout="mlx")
    hf_dir = write_model_dir(tmp_path / "hf", SYNTHETIC["qwen3_moe"], layout="hf", shards=3)
    assert reference_tokens(mlx_dir, PROMPT, 8) == reference_tokens(hf_dir, PROMPT, 8)


@pytest.mark.parametrize("kind", BROKEN_KINDS)
def test_broken_dirs(tmp_path: Path, kind: str) -> None:
    path = write_broken_dir(tmp_path / kind, kind)
    if kind != "recurrent":
        with pytest.raises((ValueError, KeyError)):  # JSONDecodeError is a ValueError
            load(str(path))
        return
    model, _ = load(str(path))  # mlx-lm runs it; only our per-layer KV split cannot
    caches = make_prompt_cache(model)
    assert caches and all(isinstance(c, ArraysCache) for c in caches)
    assert not any(isinstance(c, KVCache) for c in caches)
    assert len(reference_tokens(path, PROMPT, 4)) == 4
