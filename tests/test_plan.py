"""Partition math: largest remainder, uniform, memory-weighted and manual plans."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.plan import (
    GIB,
    ModelShape,
    NodeSpec,
    PlanError,
    balanced_ranges,
    exo_ring_memory_weighted,
    largest_remainder,
    make_plan,
    model_shape,
    parse_manual,
    plan_ranges,
    ranges_from_counts,
)


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


# ------------------------------------------------------------------ estimates and budgets

LLAMA_7B = {"hidden_size": 4096, "num_hidden_layers": 32, "intermediate_size": 11008,
            "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
            "max_position_embeddings": 4096, "tie_word_embeddings": False}


def nodes(*gib: float) -> list[NodeSpec]:
    return [NodeSpec(f"n{i}", int(g * GIB), name=f"node{i}") for i, g in enumerate(gib)]


def test_exo_example_ring_memory_weighted():
    assert exo_ring_memory_weighted(32, [64, 32, 16]) == [(0, 17), (18, 26), (27, 31)]
    shape = ModelShape(32, 1, 0, 0, 0, 1)
    plan = make_plan("ring-memory-weighted", shape, nodes(16, 64, 32))
    assert plan.ranges == [(0, 17), (18, 26), (27, 31)]
    assert [s.node.name for s in plan.shards] == ["node1", "node2", "node0"]  # biggest first


def test_llama_7b_sizes_match_the_known_parameter_count():
    shape = model_shape(LLAMA_7B, "float32")
    params = (shape.layer_bytes * 32 + shape.embed_bytes + shape.head_bytes) / 4
    assert 6.7e9 < params < 6.8e9
    assert shape.kv_bytes_per_token == 2 * 4096 * 4
    q4 = model_shape(LLAMA_7B, "float32", bits=4)
    assert q4.layer_bytes < shape.layer_bytes / 4


def test_memory_plan_respects_caps_and_estimates():
    shape = model_shape(dict(LLAMA_7B, num_hidden_layers=8), "float32")
    plan = make_plan("memory", shape, nodes(4, 3, 3), model="synthetic:llama-7b")
    assert plan.ranges == [(0, 2), (3, 5), (6, 7)]
    for s in plan.shards:
        assert s.total_bytes <= s.node.budget
        assert s.param_bytes == shape.shard_bytes(s.start, s.end)[0]


def test_a_model_that_fits_nowhere_is_refused_with_the_shortfall():
    shape = model_shape(dict(LLAMA_7B, hidden_size=5120, num_hidden_layers=40,
                             intermediate_size=13824, num_attention_heads=40,
                             num_key_value_heads=40), "float32")
    with pytest.raises(PlanError, match=r"synthetic:llama-13b does not fit: it needs 5\d\.\d\d "
                                        r"GiB .* total 10\.00 GiB .* GiB short"):
        make_plan("memory", shape, nodes(4, 3, 3), model="synthetic:llama-13b")
    for strategy in ("uniform", "speed"):
        with pytest.raises(PlanError, match="does not fit"):
            make_plan(strategy, shape, nodes(4, 3, 3))
    with pytest.raises(PlanError, match="GiB over"):
        make_plan("manual:0-1,2-38,39-39", shape, nodes(40, 40, 40))


def test_speed_strategy_weights_by_calibrated_speed_within_caps():
    shape = ModelShape(12, GIB // 4, 0, 0, 0, 1)
    fast = [NodeSpec("a", 8 * GIB, speed=300.0), NodeSpec("b", 8 * GIB, speed=100.0)]
    assert make_plan("speed", shape, fast).ranges == [(0, 8), (9, 11)]
    capped = [NodeSpec("a", 1 * GIB, speed=300.0), NodeSpec("b", 8 * GIB, speed=100.0)]
    assert make_plan("speed", shape, capped).ranges == [(0, 3), (4, 11)]


def test_balanced_puts_fewer_layers_before_a_heavy_head():
    # smollm2-135m's shape: 30 equal layers, a tied head worth 8 of them
    layer, head = 3_538_944, 28_311_552
    shape = ModelShape(30, GIB // 64, 0, 0, 0, 1, layer_macs=(layer,) * 30, head_macs=head)
    equal = [NodeSpec(str(i), 8 * GIB) for i in range(3)]
    plan = make_plan("balanced", shape, equal)
    assert plan.ranges == [(0, 11), (12, 24), (25, 29)]
    work = [s.macs for s in plan.shards]
    assert work == [shape.stage_macs(a, b) for a, b in plan.ranges]
    assert max(work) == 13 * layer  # the best any split can do: 38 layers' work over 3
    assert max(s.macs for s in make_plan("uniform", shape, equal).shards) == 10 * layer + head
    assert make_plan("balanced", shape, equal[:2]).ranges == [(0, 18), (19, 29)]


def test_balanced_follows_speeds_beyond_calibration_noise_and_memory_caps():
    shape = ModelShape(12, GIB // 4, 0, 0, 0, 1, layer_macs=(1,) * 12)
    fast = [NodeSpec("a", 8 * GIB, speed=300.0), NodeSpec("b", 8 * GIB, speed=100.0)]
    assert make_plan("balanced", shape, fast).ranges == [(0, 8), (9, 11)]
    noisy = [NodeSpec("a", 8 * GIB, speed=110.0), NodeSpec("b", 8 * GIB, speed=100.0)]
    assert make_plan("balanced", shape, noisy).ranges == [(0, 5), (6, 11)]
    capped = [NodeSpec("a", 1 * GIB, speed=300.0), NodeSpec("b", 8 * GIB, speed=100.0)]
    assert make_plan("balanced", shape, capped).ranges == [(0, 3), (4, 11)]


@settings(max_examples=200, deadline=None)
@given(macs=st.lists(st.integers(1, 50), min_size=2, max_size=9), head=st.integers(0, 200),
       budgets=st.lists(st.integers(1, 6), min_size=2, max_size=4),
       speeds=st.lists(st.sampled_from([0.0, 1.0, 2.0, 5.0]), min_size=4, max_size=4))
def test_property_balanced_is_the_fastest_split_that_fits(macs, head, budgets, speeds):
    from itertools import combinations

    n_layers, n = len(macs), len(budgets)
    shape = ModelShape(n_layers, 1, 0, 0, 0, 1, layer_macs=tuple(macs), head_macs=head)
    specs = [NodeSpec(str(i), b, speed=speeds[i]) for i, b in enumerate(budgets)]  # b layers
    rate = [1.0] * n if not all(speeds[:n]) or max(speeds[:n]) <= min(speeds[:n]) * 1.2 \
        else speeds[:n]

    def slowest(ranges):
        return max(shape.stage_macs(a, b) / rate[k] for k, (a, b) in enumerate(ranges))

    splits = [ranges_from_counts([b - a for a, b in zip((0, *cuts), (*cuts, n_layers))])
              for cuts in combinations(range(1, n_layers), n - 1)]
    fitting = [r for r in splits if all(b - a + 1 <= budgets[k] for k, (a, b) in enumerate(r))]
    got = balanced_ranges(shape, specs, 1)
    if not fitting:
        assert got is None
        return
    assert got in fitting
    assert slowest(got) == pytest.approx(min(slowest(r) for r in fitting))


@settings(max_examples=300, deadline=None)
@given(n_layers=st.integers(1, 120),
       budgets=st.lists(st.integers(0, 64 * GIB), min_size=1, max_size=8),
       layer_gib=st.floats(0.01, 4.0),
       strategy=st.sampled_from(["balanced", "memory", "uniform", "ring-memory-weighted"]))
def test_property_plans_cover_all_layers_and_never_exceed_budgets(n_layers, budgets, layer_gib,
                                                                  strategy):
    shape = ModelShape(n_layers, int(layer_gib * GIB), int(0.1 * GIB), int(0.1 * GIB), 1024,
                       512)
    specs = [NodeSpec(f"n{i}", b) for i, b in enumerate(budgets)]
    try:
        plan = make_plan(strategy, shape, specs)
    except PlanError as e:
        assert str(e)  # refusals always explain themselves
        if strategy == "memory":  # the capped strategy refuses only what cannot fit
            per_layer = shape.layer_bytes + 1024 * 512
            caps = [max(0, (b - (shape.embed_bytes if i == 0 else 0)
                            - (shape.head_bytes if i == len(budgets) - 1 else 0)) // per_layer)
                    for i, b in enumerate(budgets)]
            assert n_layers < len(budgets) or sum(caps) < n_layers or min(caps) < 1 or (
                n_layers * per_layer + shape.embed_bytes + shape.head_bytes > sum(budgets))
        return
    assert [s.start for s in plan.shards][0] == 0 and plan.shards[-1].end == n_layers - 1
    assert sum(s.layers for s in plan.shards) == n_layers
    assert all(s.layers >= 1 for s in plan.shards)
    assert all(a.end + 1 == b.start for a, b in zip(plan.shards, plan.shards[1:]))
    assert all(s.total_bytes <= s.node.budget for s in plan.shards)


def test_backends_parse_and_tensor_plans_split_every_layer():
    from node.plan import make_tensor_plan, parse_backend, tensor_split_problem

    assert parse_backend("pipeline") == ("pipeline", "")
    assert parse_backend("mlx-ring") == ("mlx-ring", "tensor")
    assert parse_backend("mlx-ring:pipeline") == ("mlx-ring", "pipeline")
    with pytest.raises(PlanError, match="unknown backend"):
        parse_backend("mlx-ring:diagonal")
    smollm2 = {"num_attention_heads": 9, "num_key_value_heads": 3, "intermediate_size": 1536}
    assert tensor_split_problem(smollm2, 3) is None
    problem = tensor_split_problem(smollm2, 2)
    assert "9 attention heads and 3 KV heads do not divide by 2" in problem
    assert "works on 3 node(s)" in problem
    config = dict(LLAMA_7B, num_hidden_layers=8)
    shape = model_shape(config, "float32")
    nodes = [NodeSpec(f"n{i}", 20 * GIB) for i in range(4)]
    plan = make_tensor_plan(shape, config, nodes)
    assert [(s.start, s.end) for s in plan.shards] == [(0, 7)] * 4
    # each rank: a quarter of the layers' weights and KV cache, embedding and head whole
    whole, kv = shape.shard_bytes(0, 7)
    layers_only = whole - shape.embed_bytes - shape.head_bytes
    assert plan.shards[0].param_bytes == layers_only // 4 + shape.embed_bytes + shape.head_bytes
    assert plan.shards[0].kv_bytes == kv // 4
    with pytest.raises(PlanError, match="needs .* GiB but n0's budget"):
        make_tensor_plan(shape, config, [NodeSpec(f"n{i}", GIB) for i in range(4)])
    with pytest.raises(PlanError, match="do not divide by 3"):
        make_tensor_plan(shape, config, nodes[:3])


def test_plan_table_shows_each_stage_share_of_the_work_and_its_predicted_step():
    from console.views import plan_table
    from node.placement import to_proto

    shape = ModelShape(4, GIB // 64, 0, 0, 0, 1, layer_macs=(10**6,) * 4, head_macs=2 * 10**6)
    specs = [NodeSpec("a", GIB, "local-0"), NodeSpec("b", GIB, "local-1")]
    plan = to_proto(make_plan("balanced", shape, specs), "m", 1)
    assert [s.macs_per_token for s in plan.shards] == [3 * 10**6, 3 * 10**6]  # 3 | 1 + head
    budgets = {"a": GIB, "b": GIB}
    text = plan_table(plan, budgets, "float32", {"a": 1.0, "b": 2.0})
    # 2 FLOPs x 3M multiply-adds x 16 rows at 1 and 2 GFLOP/s
    assert "50%    96 ms" in text.splitlines()[2] and "50%    48 ms" in text.splitlines()[3]
    assert "--calibrate" in plan_table(plan, budgets, "float32")  # says how to get STEP
