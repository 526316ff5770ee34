"""What one shard's forwards work on (node/batch.py): a request's step and its result,
the state a shard keeps for a request, and a micro-batch's decode group."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from node.errors import BadFrame, ContextOverflow
from node.sampling import RequestSampler, Sampling
from node.wire import Wire


@dataclass
class Step:
    """One request's step: the positions it computes and its input."""

    request_id: str
    position: int
    tokens: list[int] | None = None  # token ids (first shard)
    hidden: Wire | None = None  # a frame's hidden states (later shards)
    sample: Sampling | None = None  # sample a token from this step's last position
    # a request's first step: its whole prompt (the prefix cache's key); the step's
    # position is then the number of cached positions it reuses
    prompt: list[int] | None = None
    group: int = 0  # its micro-batch (a forward runs the steps of one group only)

    @property
    def size(self) -> int:
        """Positions this step computes (1 for a decode step; 0 for a malformed frame,
        which fails when its input is read)."""
        if self.tokens is not None:
            return len(self.tokens)
        if self.hidden is not None and len(self.hidden[1]) == 3:
            return int(self.hidden[1][1])
        return 0

    @property
    def decode(self) -> bool:
        """One position: a decode step (a row of the group's batched attention)."""
        return self.size == 1


@dataclass
class StepResult:
    hidden: Wire | None  # hidden states for the next shard, already serialised
    token: int | None  # sampled token (last shard, sample=True)
    compute_s: float


@dataclass
class RequestState:
    caches: list  # its own KV cache per layer (empty while its row is in the _Group)
    length: int = 0  # positions its cache holds
    last_used: float = field(default_factory=time.monotonic)
    sampler: RequestSampler | None = None  # its own random key (sampled requests)
    stepped: float = 0.0  # when its last step reached this shard
    prompt: list[int] | None = None  # its prompt's ids: its KV is cached when it ends
    group: int = 0  # the micro-batch its last step was in


@dataclass
class Group:
    """Requests that decode together, their KV caches side by side in mlx-lm's
    BatchKVCache (one per layer): a forward of exactly these rows writes and reads every
    row's cache at once. A request leaving (or stepping alone) gets its own cache back."""
    ids: list[str]
    states: list[RequestState]  # the request state each row belongs to
    caches: list


def check_activation(shard: Any, shape: list[int], dtype: str, position: int) -> None:
    """Validate an incoming hidden-state frame for `shard` before decoding it."""
    hidden = shard.hidden_size
    if len(shape) != 3 or shape[0] != 1 or shape[1] < 1 or shape[2] != hidden:
        raise BadFrame(f"activation shape {list(shape)} is wrong: expected [1, L, {hidden}]")
    if dtype != shard.dtype:
        raise BadFrame(f"activation dtype {dtype} is wrong: this shard computes in "
                       f"{shard.dtype}")
    if position + shape[1] > shard.source.context_length:
        raise ContextOverflow(
            f"positions {position}..{position + shape[1] - 1} exceed the context length "
            f"{shard.source.context_length}"
        )


def fits_padding(lengths: list[int], pad_factor: float = 2.0) -> bool:
    """Whether caches of these lengths may share one BatchKVCache: padded to the longest,
    they hold at most `pad_factor` times their own positions (plus one allocation step of
    256 positions per row, which every cache rounds up to anyway)."""
    return len(lengths) * max(lengths) <= pad_factor * sum(lengths) + 256 * len(lengths)
