"""Splitting a count of layers over nodes: the arithmetic of the plan strategies, with no
model sizes (node/plan.py joins it to byte estimates and memory budgets). Pure functions."""

from __future__ import annotations

import re


class PlanError(ValueError):
    """A plan that cannot be made; the message says why and what to change."""


def largest_remainder(total: int, weights: list[float]) -> list[int]:
    """Split `total` items in proportion to `weights`, at least one each."""
    n = len(weights)
    if n == 0:
        raise PlanError("no nodes to place layers on")
    if total < n:
        raise PlanError(f"{total} layers cannot be split over {n} nodes (each needs >= 1)")
    if any(w < 0 for w in weights):
        raise PlanError("weights must be >= 0")
    wsum = sum(weights)
    shares = [total * w / wsum for w in weights] if wsum > 0 else [total / n] * n
    counts = [int(s) for s in shares]
    order = sorted(range(n), key=lambda i: (shares[i] - counts[i], weights[i], -i), reverse=True)
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    # every node holds at least one layer: take them from the nodes holding the most
    for i in range(n):
        while counts[i] == 0:
            donor = max(range(n), key=lambda j: (counts[j], -j))
            counts[donor] -= 1
            counts[i] += 1
    return counts


def capped_largest_remainder(total: int, weights: list[float], caps: list[int]) -> list[int]:
    """Largest remainder, then move layers off nodes above their cap onto nodes with room
    (in proportion to weight). Assumes sum(caps) >= total and every cap >= 1."""
    counts = largest_remainder(total, weights)
    for _ in range(total * len(caps)):  # bounded: each pass moves at least one layer
        over = [i for i, (c, cap) in enumerate(zip(counts, caps)) if c > cap]
        if not over:
            return counts
        i = over[0]
        room = [j for j in range(len(caps)) if counts[j] < caps[j]]
        # the node with the most weight per layer it already holds gets the layer
        j = max(room, key=lambda k: (weights[k] / (counts[k] + 1), caps[k] - counts[k], -k))
        counts[i] -= 1
        counts[j] += 1
    return counts


def ranges_from_counts(counts: list[int]) -> list[tuple[int, int]]:
    out, start = [], 0
    for c in counts:
        out.append((start, start + c - 1))
        start += c
    return out


def parse_manual(text: str, n_layers: int, n_nodes: int) -> list[tuple[int, int]]:
    """'0-9,10-19,20-29' -> [(0, 9), (10, 19), (20, 29)], checked for full coverage."""
    ranges = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", part)
        if not m:
            raise PlanError(f"bad range {part!r} in manual plan: write START-END, e.g. 0-9")
        ranges.append((int(m.group(1)), int(m.group(2))))
    if len(ranges) != n_nodes:
        raise PlanError(f"manual plan has {len(ranges)} ranges for {n_nodes} nodes")
    expected = 0
    for start, end in ranges:
        if start != expected or end < start:
            raise PlanError(f"manual ranges must be contiguous from layer 0: {start}-{end} "
                            f"should start at {expected}")
        expected = end + 1
    if expected != n_layers:
        raise PlanError(f"manual plan covers layers 0-{expected - 1}; the model has {n_layers} "
                        f"(0-{n_layers - 1})")
    return ranges


def exo_ring_memory_weighted(n_layers: int, memories: list[int]) -> list[tuple[int, int]]:
    """exo's RingMemoryWeightedPartitioningStrategy + map_partitions_to_shards, in the
    given order (callers sort by memory, largest first, as exo does)."""
    total = sum(memories)
    if total <= 0:
        raise PlanError("nodes report no memory")
    cuts, start = [], 0.0
    for mem in memories:
        end = round(start + mem / total, 5)
        cuts.append((start, end))
        start = end
    ranges = []
    for i, (a, b) in enumerate(cuts):
        first, last = int(a * n_layers), int(b * n_layers) - 1
        if i == len(cuts) - 1:
            last = n_layers - 1
        if first > last:
            raise PlanError(f"exo's rounding leaves node {i} without layers; use --strategy memory")
        ranges.append((first, last))
    return ranges
