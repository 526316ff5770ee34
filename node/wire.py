"""The data plane's wire codec: hidden states as raw bytes + shape + dtype name.

fp32 and fp16 travel as they are and bf16 as its uint16 bits; no pickle, no compression.
Incoming bytes are checked (length, dtype, finite values) before MLX sees them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from node.errors import BadFrame

# the compute dtypes a shard can run in and send; an index in this tuple is the dtype's
# code where a number must name it (the mlx-ring pipeline's control message)
DTYPES = ("float32", "float16", "bfloat16")
# wire dtype name -> numpy dtype of the raw bytes (bfloat16 travels as its uint16 bits)
WIRE_DTYPES = dict(zip(DTYPES, (np.float32, np.float16, np.uint16)))

Wire = tuple[bytes, list[int], str]  # raw tensor bytes, shape, dtype name


def encode_tensor(array: Any) -> Wire:
    """mx.array -> (raw bytes, shape, dtype name) without going through pickle."""
    return encode_rows(array, [array.shape[1]])[0]


def encode_rows(array: Any, lengths: list[int]) -> list[Wire]:
    """The first lengths[i] positions of row i of hidden states [B, L, hidden], each as a
    Wire [1, lengths[i], hidden]; one evaluation for all of them."""
    import mlx.core as mx

    dtype = str(array.dtype).removeprefix("mlx.core.")
    if dtype not in WIRE_DTYPES:
        raise BadFrame(f"cannot send dtype {dtype}")
    raw = np.asarray(memoryview(array.view(mx.uint16) if dtype == "bfloat16" else array))
    return [(raw[i:i + 1, :n].tobytes(), [1, n, *array.shape[2:]], dtype)
            for i, n in enumerate(lengths)]


def decode_tensor(data: bytes, shape: list[int], dtype: str) -> Any:
    """The inverse of encode_tensor; raises BadFrame on anything inconsistent."""
    import mlx.core as mx

    if dtype not in WIRE_DTYPES:
        raise BadFrame(f"unsupported tensor dtype {dtype!r}; expected one of {sorted(WIRE_DTYPES)}")
    np_dtype = np.dtype(WIRE_DTYPES[dtype])
    count = int(np.prod(shape)) if shape else 1
    if count * np_dtype.itemsize != len(data):
        raise BadFrame(
            f"tensor bytes do not match shape {list(shape)} x {dtype}: got {len(data)} bytes, "
            f"expected {count * np_dtype.itemsize}"
        )
    values = np.frombuffer(data, dtype=np_dtype)
    # checked here, in numpy, not with an MLX evaluation per frame
    finite = ((values & 0x7F80) != 0x7F80).all() if dtype == "bfloat16" else (
        np.isfinite(values).all())
    if not finite:
        raise BadFrame("activation holds NaN or infinite values (corrupted or garbage bytes?)")
    arr = mx.array(values.reshape(shape))
    return arr.view(mx.bfloat16) if dtype == "bfloat16" else arr
