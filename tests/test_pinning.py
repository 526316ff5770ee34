"""A core per node: `mlx-node serve --cpus` pins the process, every thread it starts and
its BLAS thread count; `local up --cpus-per-node` deals the cores out and refuses more
than the machine has unless told to share."""

from __future__ import annotations

import os

import psutil
import pytest

from console.client import ClusterError
from console.local import cpu_lists
from node.blas import parse_cpus
from tests.conftest import spawn_node

pytestmark = pytest.mark.skipif(not hasattr(os, "sched_getaffinity"),
                                reason="CPU affinity is Linux-only")


def test_cpu_lists_deal_cores_and_refuse_oversubscription():
    cores = sorted(os.sched_getaffinity(0))
    assert cpu_lists(1, 1) == [str(cores[0])]
    n = len(cores) + 1
    with pytest.raises(ClusterError, match="--oversubscribe"):
        cpu_lists(n, 1)
    shared = cpu_lists(n, 1, oversubscribe=True)
    assert shared[-1] == str(cores[0])  # dealt round again
    for bad in ("x", "1-0", ""):
        with pytest.raises(ValueError, match="--cpus"):
            parse_cpus(bad)
    with pytest.raises(ValueError, match="may use CPUs"):
        parse_cpus(str(max(cores) + 1))


def test_a_pinned_node_keeps_every_thread_on_its_cpu(tmp_path):
    cpu = sorted(os.sched_getaffinity(0))[-1]
    proc, ready = spawn_node(tmp_path / "ready.json", "--no-advertise", "--cpus", str(cpu),
                             "--state-dir", str(tmp_path / "state"))
    try:
        node = psutil.Process(ready["pid"])
        threads = node.threads()
        assert len(threads) > 2  # gRPC's, the MLX thread, BLAS's: all started after pinning
        for t in threads:
            with open(f"/proc/{node.pid}/task/{t.id}/status") as f:
                allowed = next(line for line in f if line.startswith("Cpus_allowed_list"))
            assert allowed.split()[-1] == str(cpu), allowed
        assert node.environ().get("OPENBLAS_NUM_THREADS") == "1"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
