"""Protocol versions: every node reports the one it speaks, and a plan over a node that
speaks another is refused before anything loads, naming the node and both versions."""

from __future__ import annotations

import asyncio
import os

import pytest

from node import PROTOCOL_VERSION
from node.placement import check_versions
from node.plan import NodeSpec, PlanError
from protos import cluster_pb2 as pb
from tests.conftest import spawn_node
from tests.helpers import addresses, mlx_cluster, node_info


def test_check_versions_names_each_odd_node_and_both_versions():
    same = pb.NodeInfo(node_id="a1", name="alpha", protocol_version=PROTOCOL_VERSION)
    old = pb.NodeInfo(node_id="b2", name="beta", protocol_version=PROTOCOL_VERSION - 1)
    unversioned = pb.NodeInfo(node_id="c3", name="gamma")
    check_versions([same], PROTOCOL_VERSION)
    check_versions([NodeSpec("d4", 1)], PROTOCOL_VERSION)  # specs carry no version
    with pytest.raises(PlanError) as refused:
        check_versions([same, old, unversioned], PROTOCOL_VERSION)
    message = str(refused.value)
    assert f"beta (b2) speaks protocol version {PROTOCOL_VERSION - 1}" in message
    assert "gamma (c3) speaks protocol version 0" in message
    assert f"needs version {PROTOCOL_VERSION}" in message
    assert "alpha" not in message


@pytest.mark.cluster
async def test_load_refuses_a_node_of_another_version(small_cluster, tmp_path):
    cluster = await asyncio.to_thread(small_cluster, 2, node_args=["--no-advertise"])
    proc, ready = await asyncio.to_thread(
        spawn_node, tmp_path / "old.ready.json", "--no-advertise", "--name", "old-1",
        "--state-dir", str(tmp_path / "old"), "--protocol-version", "1")
    try:
        addrs = [*addresses(cluster), ready["address"]]
        infos = [await node_info(a) for a in addrs]
        assert [i.protocol_version for i in infos] == [PROTOCOL_VERSION] * 2 + [1]
        res = await asyncio.to_thread(mlx_cluster, "load", "--nodes", ",".join(addrs),
                                      "--model", "synthetic:tiny", env=dict(os.environ))
        assert res.returncode == 1, res.stdout
        assert f"old-1 ({ready['node_id']}) speaks protocol version 1" in res.stderr
        assert f"needs version {PROTOCOL_VERSION}" in res.stderr
        assert "Traceback" not in res.stderr
        for address in addrs:
            assert not (await node_info(address)).HasField("shard"), address
    finally:
        proc.kill()
        proc.wait(timeout=10)
