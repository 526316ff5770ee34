"""Sampling, the same on every backend: mlx-lm's sampler, drawn from each request's own
random key.

mlx-lm's `make_sampler(temp, top_p)` draws from MLX's global key, which every request of
a batch (and every request before it) advances, so a seeded request would not give the
same tokens twice, nor the same on two backends. Here a request's key is made from its
seed at its first sampled token and split at every token; the filter and the draw are
mlx-lm's (`apply_top_p`, then a categorical draw at the temperature).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any


@dataclass
class Sampling:
    temperature: float = 0.0
    top_p: float = 0.0
    seed: int = -1  # -1: a random seed


def row_logprobs(logits: Any) -> Any:
    """Log-probabilities of logits [..., vocab], normalised per row (as generate_step)."""
    import mlx.core as mx

    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def draw(sample: Sampling, logprobs: Any, key: Any) -> tuple[Any, Any]:
    """One token from log-probabilities [1, vocab], and the request's key for its next
    token (`key` None: its first sampled token; the key comes from its seed)."""
    import mlx.core as mx
    from mlx_lm.sample_utils import apply_top_p

    if sample.temperature == 0:
        return mx.argmax(logprobs, axis=-1), key
    if key is None:
        key = mx.random.key(sample.seed if sample.seed >= 0 else random.getrandbits(63))
    if 0 < sample.top_p < 1:
        logprobs = apply_top_p(logprobs, sample.top_p)
    key, now = mx.random.split(key)
    return mx.random.categorical(logprobs * (1 / sample.temperature), key=now), key


class RequestSampler:
    """One request's sampler as mlx-lm's `generate_step` calls it (`sampler(logprobs)`),
    holding its key between tokens."""

    def __init__(self, sample: Sampling) -> None:
        self.sample = sample
        self.key: Any = None

    def __call__(self, logprobs: Any) -> Any:
        token, self.key = draw(self.sample, logprobs, self.key)
        return token


def sample_rows(logits: Any, samplers: list[RequestSampler]) -> list[int]:
    """One token for each row of logits [n, vocab], each with its request's sampler,
    evaluated together (one sync, not n). Greedy rows take the argmax of the logits,
    which the log-softmax would not move."""
    import mlx.core as mx

    if all(s.sample.temperature == 0 for s in samplers):
        return mx.argmax(logits, axis=-1).tolist()
    logprobs = row_logprobs(logits)
    drawn = [s(logprobs[i:i + 1]) for i, s in enumerate(samplers)]
    mx.eval(drawn)
    return [int(d.item()) for d in drawn]
