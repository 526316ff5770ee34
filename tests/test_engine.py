"""Shard engine and model specs in one process: wire format, synthetic layers, caches."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from node.engine import Engine, Sampling, decode_tensor, encode_tensor
from node.errors import BadFrame, FrameGap, ModelError
from node.models import ByteTokenizer, load_shard, resolve, synthetic_full_model


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_tensor_wire_round_trip(dtype):
    a = (mx.random.normal((1, 3, 8)) * 3).astype(getattr(mx, dtype))
    data, shape, name = encode_tensor(a)
    assert name == dtype and shape == [1, 3, 8]
    b = decode_tensor(data, shape, name)
    assert b.dtype == a.dtype
    assert mx.array_equal(a, b).item()


def test_decode_rejects_inconsistent_tensors():
    with pytest.raises(BadFrame, match="got 10 bytes, expected 128"):
        decode_tensor(b"\x00" * 10, [1, 1, 32], "float32")
    with pytest.raises(BadFrame, match="unsupported tensor dtype"):
        decode_tensor(b"\x00" * 32, [1, 1, 32], "int8")
    with pytest.raises(BadFrame, match="NaN"):
        decode_tensor(np.full(32, np.inf, np.float32).tobytes(), [1, 1, 32], "float32")


def test_synthetic_shard_makes_only_its_layers_and_they_match_the_whole_model():
    source = resolve("synthetic:tiny")
    shard = load_shard(source, 2, 4)
    whole = synthetic_full_model("synthetic:tiny")
    assert len(shard.layers) == 3 and not shard.is_first and not shard.is_last
    for mine, ref in zip(shard.layers, whole.model.layers[2:5]):
        for (name, a), (_, b) in zip(tree_flatten(mine.parameters()),
                                     tree_flatten(ref.parameters())):
            assert mx.array_equal(a, b).item(), name
    # a middle shard evaluates neither embedding nor head
    assert shard.weight_bytes == sum(p.nbytes for _, p in tree_flatten(
        [layer.parameters() for layer in shard.layers]))


def test_synthetic_layers_override_and_13b_shape_without_materialising():
    source = resolve("synthetic:llama-13b", layers=4)
    assert source.n_layers == 4 and source.config["hidden_size"] == 5120
    with pytest.raises(ModelError, match="unknown dtype"):
        resolve("synthetic:tiny", dtype="float8")
    with pytest.raises(ModelError, match="--layers only applies"):
        resolve("smollm2-135m", layers=3)
    with pytest.raises(ModelError, match="out of bounds"):
        load_shard(resolve("synthetic:tiny"), 3, 8)


def test_engine_checks_positions_and_frees_caches():
    shard = load_shard(resolve("synthetic:tiny"), 0, 7)
    engine = Engine(shard, ThreadPoolExecutor(1))

    async def run():
        ids = ByteTokenizer().encode("hi", chat=False)
        r = await engine.step("a", 0, tokens=ids, sample=Sampling())
        assert r.token is not None and r.hidden is None and r.compute_s > 0
        assert engine.cache_offset("a") == len(ids)
        with pytest.raises(FrameGap, match="cache holds 3 positions: frames were lost"):
            await engine.step("a", 7, tokens=[1], sample=Sampling())
        with pytest.raises(FrameGap, match="must start at 0"):
            await engine.step("b", 4, tokens=[1], sample=Sampling())
        with pytest.raises(BadFrame, match="out of range"):
            await engine.step("c", 0, tokens=[9999], sample=Sampling())
        assert engine.active_requests == 1
        assert engine.free("a") and engine.active_requests == 0
        await engine.step("d", 0, tokens=[1], sample=Sampling())
        assert engine.free_idle(0.0) == ["d"]

    asyncio.run(run())


def test_byte_tokenizer_streams_utf8():
    tok = ByteTokenizer()
    ids = tok.encode("héllo ✓", chat=False)
    assert ids[0] == ByteTokenizer.BOS
    detok = tok.detokenizer()
    out = ""
    for t in ids[1:]:
        detok.add_token(t)
        out += detok.last_segment
    detok.finalize()
    assert out + detok.last_segment == "héllo ✓"
