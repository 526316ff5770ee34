"""Partition planning: which contiguous layer range each node holds. Pure functions.

Ranges are inclusive at both ends, as in exo's Shard: (0, 9) is ten layers. Counts are
apportioned with the largest-remainder method, so they always sum to the layer count
(exo's float-range rounding could over-fill a node), and every node gets at least one.
"""

from __future__ import annotations

import re

STRATEGIES = ("uniform", "memory", "manual:A-B,C-D,...")


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


def plan_ranges(strategy: str, n_layers: int, budgets: list[int]) -> list[tuple[int, int]]:
    """Layer ranges, one per node in the given order, for a strategy name."""
    if strategy == "uniform":
        return ranges_from_counts(largest_remainder(n_layers, [1.0] * len(budgets)))
    if strategy == "memory":
        return ranges_from_counts(largest_remainder(n_layers, [float(b) for b in budgets]))
    if strategy.startswith("manual:"):
        return parse_manual(strategy[len("manual:"):], n_layers, len(budgets))
    raise PlanError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
