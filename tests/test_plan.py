"""Partition math: largest remainder, uniform, memory-weighted and manual plans."""

from __future__ import annotations

import pytest

from node.plan import PlanError, largest_remainder, parse_manual, plan_ranges, ranges_from_counts


def test_uniform_splits_evenly_and_covers_every_layer():
    assert plan_ranges("uniform", 30, [1, 1, 1]) == [(0, 9), (10, 19), (20, 29)]
    assert plan_ranges("uniform", 8, [5, 1, 1]) == [(0, 2), (3, 5), (6, 7)]


def test_memory_weighted_follows_budgets_with_at_least_one_layer_each():
    gib = 2**30
    budgets = [64 * gib, 32 * gib, 16 * gib]
    assert plan_ranges("memory", 32, budgets) == [(0, 17), (18, 26), (27, 31)]
    counts = largest_remainder(10, [1000.0, 1.0, 1.0])
    assert counts == [8, 1, 1]


@pytest.mark.parametrize("total", [3, 7, 30, 31, 100])
@pytest.mark.parametrize("weights", [[1, 1, 1], [5, 3, 1], [0, 0, 1], [2.5, 2.5, 0.1, 9]])
def test_largest_remainder_sums_to_total(total, weights):
    if total < len(weights):
        with pytest.raises(PlanError, match="each needs >= 1"):
            largest_remainder(total, [float(w) for w in weights])
        return
    counts = largest_remainder(total, [float(w) for w in weights])
    assert sum(counts) == total and min(counts) >= 1
    ranges = ranges_from_counts(counts)
    assert ranges[0][0] == 0 and ranges[-1][1] == total - 1


def test_manual_plans_are_checked():
    assert parse_manual("0-1,2-4,5-7", 8, 3) == [(0, 1), (2, 4), (5, 7)]
    with pytest.raises(PlanError, match="3 ranges for 2 nodes"):
        parse_manual("0-1,2-4,5-7", 8, 2)
    with pytest.raises(PlanError, match="contiguous"):
        parse_manual("0-1,3-4,5-7", 8, 3)
    with pytest.raises(PlanError, match="covers layers 0-6"):
        parse_manual("0-1,2-4,5-6", 8, 3)
    with pytest.raises(PlanError, match="bad range"):
        parse_manual("0-1,two-4,5-7", 8, 3)


def test_too_few_layers_and_unknown_strategy():
    with pytest.raises(PlanError, match="2 layers cannot be split over 3 nodes"):
        plan_ranges("uniform", 2, [1, 1, 1])
    with pytest.raises(PlanError, match="unknown strategy"):
        plan_ranges("fastest", 8, [1, 1])
