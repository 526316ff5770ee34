"""Log-bucket histograms: percentiles within bucket resolution, exact merges."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from node.histogram import Histogram, bucket_of, bucket_upper

RESOLUTION = 2 ** (1 / 8)  # one bucket


def test_percentiles_are_within_one_bucket_of_the_exact_value():
    rng = random.Random(7)
    values = [rng.lognormvariate(-3, 1) for _ in range(5000)]
    h = Histogram()
    for v in values:
        h.record(v)
    ordered = sorted(values)
    for q in (50, 90, 99):
        exact = ordered[max(0, int(q / 100 * len(values)) - 1)]
        assert exact / RESOLUTION <= h.percentile(q) <= exact * RESOLUTION * RESOLUTION
    assert h.total == 5000 and abs(h.mean - sum(values) / 5000) < 1e-9
    assert h.percentile(100) == max(values)


@given(st.lists(st.floats(1e-7, 500), max_size=200), st.lists(st.floats(1e-7, 500),
                                                                max_size=200))
def test_merging_equals_recording_everything_once(a, b):
    ha, hb, hall = Histogram(), Histogram(), Histogram()
    for v in a:
        ha.record(v)
        hall.record(v)
    for v in b:
        hb.record(v)
        hall.record(v)
    merged = Histogram.merged([ha, hb])
    assert merged.pairs() == hall.pairs() and merged.total == hall.total
    assert Histogram.from_pairs(merged.pairs()).pairs() == merged.pairs()


def test_buckets_are_monotonic_and_cover_the_range():
    assert bucket_of(0) == 0 and bucket_of(1e-9) == 0
    assert bucket_of(1e-3) < bucket_of(2e-3) < bucket_of(1.0) <= bucket_of(1e6)
    for v in (3e-6, 0.01, 0.5, 7.0):
        assert v <= bucket_upper(bucket_of(v)) < v * RESOLUTION * 1.0001
