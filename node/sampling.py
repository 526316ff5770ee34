"""Sampling, the same on every backend: mlx-lm's sampler, drawn from a key made from the
request's seed and the position of the token being drawn.

mlx-lm's `make_sampler(temp, top_p)` draws from MLX's global key, which every request of
a batch (and every request before it) advances, so a seeded request would not give the
same tokens twice, nor the same on two backends. Here the key of the token at sequence
position p is made from (seed, p) alone: a request resumed on another node after its
entry node was lost (tokens replayed, then sampling again from position p) draws exactly
what the uninterrupted run drew. The filter and the draw are mlx-lm's (`apply_top_p`, then
a categorical draw at the temperature).
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


def key_for(seed: int, position: int) -> Any:
    """The random key of the token at sequence `position` of a request seeded `seed`."""
    import mlx.core as mx

    return mx.random.key((seed * 0x9E3779B97F4A7C15 + position) % 2**64)


def draw(sample: Sampling, logprobs: Any, position: int) -> Any:
    """One token, to be sequence `position`, from log-probabilities [1, vocab] (a seed
    must be set: RequestSampler sets one)."""
    import mlx.core as mx
    from mlx_lm.sample_utils import apply_top_p

    if sample.temperature == 0:
        return mx.argmax(logprobs, axis=-1)
    if 0 < sample.top_p < 1:
        logprobs = apply_top_p(logprobs, sample.top_p)
    return mx.random.categorical(logprobs * (1 / sample.temperature),
                                 key=key_for(sample.seed, position))


class RequestSampler:
    """One request's sampler. Called as `sampler(logprobs, position)`, or as mlx-lm's
    `generate_step` calls it, `sampler(logprobs)`, for consecutive positions from
    `position` on. An unseeded request is given a random seed, once."""

    def __init__(self, sample: Sampling, position: int = 0) -> None:
        seed = sample.seed if sample.seed >= 0 else random.getrandbits(63)
        self.sample = Sampling(sample.temperature, sample.top_p, seed)
        self.position = position  # of the next token drawn without a position

    def __call__(self, logprobs: Any, position: int | None = None) -> Any:
        if position is None:
            position = self.position
        self.position = position + 1
        return draw(self.sample, logprobs, position)


def sample_rows(logits: Any, samplers: list[RequestSampler],
                positions: list[int] | None = None) -> list[int]:
    """One token for each row of logits [n, vocab], each with its request's sampler (at
    its sequence position), evaluated together (one sync, not n). Greedy rows take the
    argmax of the logits, which the log-softmax would not move."""
    import mlx.core as mx

    if all(s.sample.temperature == 0 for s in samplers):
        return mx.argmax(logits, axis=-1).tolist()
    logprobs = row_logprobs(logits)
    positions = positions or [None] * len(samplers)
    drawn = [s(logprobs[i:i + 1], p) for i, (s, p) in enumerate(zip(samplers, positions))]
    mx.eval(drawn)
    return [int(d.item()) for d in drawn]
