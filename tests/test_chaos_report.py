"""The chaos soak's verdict and report, from a result document (the soak itself runs for
minutes: `mlx-cluster bench --local --scenario chaos --duration 20m`, see the README)."""

from __future__ import annotations

import argparse
import json
import os

import pytest

from console.chaos import rss_growth
from console.parser import duration
from console.report import render
from console.views import chaos_passed, chaos_text
from tests.helpers import mlx_cluster


def soak(**changes) -> dict:
    chaos = {"model": "smollm2-135m", "duration_s": 1200.0, "concurrency": 4, "tokens": 32,
             "seed": 0, "nodes": 3, "requests": 500, "succeeded": 500, "identical": 500,
             "errors": [], "longest_stall_s": 3.2, "longest_stalls": [],
             "one_plan_per_epoch": True, "split_brain": [], "first_epoch": 1,
             "epochs": [{"epoch": 1, "shards": []}, {"epoch": 9, "shards": []}],
             "faults": [{"kind": "kill", "node": "local-1", "rejoin_s": 11.5},
                        {"kind": "loss", "node": "local-0"}],
             "memory": [], "rss_growth_after_warmup": {"aaaa pid 1": 0.02},
             "kv_bytes_baseline": {"aaaa": 70000}, "kv_bytes_after": {"aaaa": 50000}}
    chaos.update(changes)
    return {"schema": "mlx-cluster-bench/1", "created_unix": 0, "backend": "pipeline",
            "workload": {"model": "smollm2-135m", "prompt_tokens": 64, "gen_tokens": 32,
                         "requests": 8, "concurrency": [4], "warmup": 1,
                         "strategy": "memory"},
            "configurations": [], "scenarios": [], "chaos": chaos, "_source": "c.json"}


def test_a_soak_passes_only_when_every_answer_is_exact_and_one_plan_held_each_epoch():
    assert chaos_passed(soak()["chaos"])
    assert not chaos_passed(soak(succeeded=499)["chaos"])
    assert not chaos_passed(soak(identical=499)["chaos"])
    assert not chaos_passed(soak(one_plan_per_epoch=False)["chaos"])
    assert not chaos_passed(soak(requests=0, succeeded=0, identical=0)["chaos"])
    text = chaos_text(soak()["chaos"])
    assert "500/500 requests succeeded" in text and text.endswith("PASSED")


def test_the_report_has_a_chaos_section():
    report = render([soak()])
    assert "## Chaos soak" in report and "**passed**" in report
    assert "| requests succeeded | 500/500 |" in report
    assert "| faults | kill x1, loss x1 |" in report and "11.5-11.5 s" in report
    assert "**FAILED**" in render([soak(identical=12)])


def test_rss_growth_counts_each_process_from_its_own_first_two_minutes():
    def sample(pid, t, rss, epoch=1, layers=(0, 9), **more):
        return {"node": "a", "pid": pid, "t_s": t, "rss_bytes": rss, "epoch": epoch,
                "layers": list(layers), **more}

    memory = [sample(1, t, r) for t, r in ((0, 100), (130, 200), (400, 210))]
    # restarted at 300 s; its plan switches at 440 s (caches emptied, refilled by 480 s)
    memory += [sample(2, 300, 50), sample(2, 420, 100), sample(2, 430, 180, extra_plans=1),
               sample(2, 440, 90, epoch=2), sample(2, 460, 95, epoch=2),
               sample(2, 480, 100, epoch=2), sample(2, 500, 101, epoch=2)]
    # the last shard differs: only samples of the same layers count
    memory += [sample(3, 0, 100), sample(3, 130, 300), sample(3, 200, 150, layers=(0, 14)),
               sample(3, 400, 160, layers=(0, 14))]
    assert rss_growth(memory) == pytest.approx({"a pid 1": 0.05, "a pid 2": 0.01,
                                                "a pid 3": 160 / 150 - 1})


def test_durations_and_the_local_requirement():
    assert duration("20m") == 1200 and duration("1h") == 3600 and duration("90") == 90
    for bad in ("soon", "-5m", "0"):
        with pytest.raises(argparse.ArgumentTypeError):
            duration(bad)
    res = mlx_cluster("bench", "--scenario", "chaos", "--duration", "1m", "--nodes",
                      "127.0.0.1:9", "--json", env=dict(os.environ))
    assert res.returncode == 1 and "--local" in json.loads(res.stdout or "{}").get(
        "error", res.stderr)
