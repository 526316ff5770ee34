"""Fixed log-spaced latency histograms (HDR-style), mergeable exactly and cheaply.

Every histogram shares one bucket layout: 8 buckets per power of two from 1 µs to about
100 s (~9% relative resolution). Merging two histograms (other nodes, other time windows)
is adding their counts, so a console can build sliding windows from per-interval deltas
without keeping raw samples. Hand-written rather than taken from hdrhistogram because the
layout must be identical on every node and travel as a sparse list of (bucket, count) in
protobuf; the arithmetic is a dozen lines.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

MIN_S = 1e-6
PER_OCTAVE = 8
N_BUCKETS = math.ceil(math.log2(100.0 / MIN_S) * PER_OCTAVE) + 1


def bucket_of(seconds: float) -> int:
    if seconds <= MIN_S:
        return 0
    return min(N_BUCKETS - 1, math.ceil(math.log2(seconds / MIN_S) * PER_OCTAVE))


def bucket_upper(index: int) -> float:
    """The largest value a bucket holds (its upper bound)."""
    return MIN_S * 2 ** (index / PER_OCTAVE)


def bucket_mid(index: int) -> float:
    """A representative value of a bucket (geometric middle of its bounds)."""
    return MIN_S * 2 ** ((index - 0.5) / PER_OCTAVE) if index else MIN_S


class Histogram:
    __slots__ = ("counts", "total", "sum_s", "max_s")

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.total = 0
        self.sum_s = 0.0
        self.max_s = 0.0

    def record(self, seconds: float) -> None:
        i = bucket_of(seconds)
        self.counts[i] = self.counts.get(i, 0) + 1
        self.total += 1
        self.sum_s += seconds
        self.max_s = max(self.max_s, seconds)

    def merge(self, other: Histogram) -> Histogram:
        for i, c in other.counts.items():
            self.counts[i] = self.counts.get(i, 0) + c
        self.total += other.total
        self.sum_s += other.sum_s
        self.max_s = max(self.max_s, other.max_s)
        return self

    @classmethod
    def merged(cls, parts: Iterable[Histogram]) -> Histogram:
        out = cls()
        for p in parts:
            out.merge(p)
        return out

    def percentile(self, q: float) -> float:
        """Value at quantile q (0-100): the upper bound of the bucket holding it."""
        if not self.total:
            return 0.0
        rank = max(1, math.ceil(q / 100 * self.total))
        seen = 0
        for i in sorted(self.counts):
            seen += self.counts[i]
            if seen >= rank:
                return min(bucket_upper(i), self.max_s)
        return self.max_s

    @property
    def mean(self) -> float:
        return self.sum_s / self.total if self.total else 0.0

    def pairs(self) -> list[tuple[int, int]]:
        return sorted(self.counts.items())

    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[int, int]], sum_s: float = 0.0,
                   max_s: float = 0.0) -> Histogram:
        h = cls()
        for i, c in pairs:
            if 0 <= i < N_BUCKETS and c > 0:
                h.counts[i] = h.counts.get(i, 0) + c
                h.total += c
        h.sum_s, h.max_s = sum_s, max_s
        return h
