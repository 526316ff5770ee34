"""Finding nodes: zeroconf on loopback, static --nodes and peers files, conflicts."""

from __future__ import annotations

import asyncio
import json
import os
import signal

import pytest

from console.client import ClusterError
from console.discovery import Discovery, read_peers_file
from tests.conftest import spawn_node
from tests.helpers import addresses, eventually, mlx_cluster

pytestmark = pytest.mark.cluster
LOOPBACK = ["127.0.0.1"]


async def wait_for(discovery: Discovery, kind: str, ids: set[str], timeout: float) -> None:
    """Until `discovery` has reported a `kind` event for every node in `ids`."""
    seen: set[str] = set()

    async def all_seen() -> bool:
        event = await discovery.next_event(0.5)
        if event is not None and event.kind == kind and event.node_id in ids:
            seen.add(event.node_id)
        return seen == ids

    await eventually(all_seen, timeout, f"{kind!r} events from {len(ids)} node(s)", 0)


async def test_three_advertising_nodes_are_found_and_a_stopped_one_disappears(small_cluster,
                                                                               tmp_path):
    cluster = await asyncio.to_thread(small_cluster, 3)
    ids = {n["node_id"] for n in cluster["nodes"]}

    env = dict(os.environ, MLX_CLUSTER=str(tmp_path / "unused.json"))
    res = await asyncio.to_thread(mlx_cluster, "discover", "--json", "--interface", "127.0.0.1",
                                  "--timeout", "3.5", env=env)
    assert res.returncode == 0, res.stderr
    found = json.loads(res.stdout)["nodes"]
    ours = [n for n in found if n["node_id"] in ids]
    assert sorted(n["node_id"] for n in ours) == sorted(ids)  # each exactly once
    assert all(n["capabilities"]["memory_total"] > 0 and n["capabilities"]["mlx_version"]
               for n in ours)
    assert all(n["advertising"] for n in ours)

    async with Discovery(interfaces=LOOPBACK, check_interval_s=1.0) as browser:
        await wait_for(browser, "up", ids, 5.0)
        victim = cluster["nodes"][1]
        os.kill(victim["pid"], signal.SIGTERM)
        await wait_for(browser, "down", {victim["node_id"]}, 5.0)
        assert victim["address"] not in browser.up


async def test_static_nodes_and_peers_file_with_advertising_off(small_cluster, tmp_path):
    cluster = await asyncio.to_thread(small_cluster, 2, node_args=["--no-advertise"])
    addrs = addresses(cluster)
    peers = tmp_path / "peers.toml"
    peers.write_text("".join(f'[[node]]\naddress = "{a}"\nname = "n{i}"\n\n'
                             for i, a in enumerate(addrs)))
    assert read_peers_file(peers) == addrs
    env = dict(os.environ, MLX_CLUSTER=str(tmp_path / "unused.json"))

    for source in (["--nodes", ",".join(addrs)], ["--peers-file", str(peers)]):
        res = await asyncio.to_thread(mlx_cluster, "discover", "--json", "--no-mdns",
                                      "--timeout", "1.5", *source, env=env)
        assert res.returncode == 0, res.stderr
        assert sorted(n["address"] for n in json.loads(res.stdout)["nodes"]) == sorted(addrs)
        status = await asyncio.to_thread(mlx_cluster, "status", "--json", *source, env=env)
        assert [n["up"] for n in json.loads(status.stdout)["nodes"]] == [True, True]
        assert not any(n["advertising"] for n in json.loads(status.stdout)["nodes"])

    bad = tmp_path / "bad.toml"
    bad.write_text("[[node]]\nhost = 'x'\n")
    with pytest.raises(ClusterError, match="address"):
        read_peers_file(bad)


async def test_two_nodes_with_one_id_are_a_conflict(tmp_path):
    state = tmp_path / "copied-state"
    procs, addrs = [], []
    try:
        for i in range(2):
            proc, ready = await asyncio.to_thread(
                spawn_node, tmp_path / f"ready{i}.json", "--no-advertise", "--state-dir",
                str(state))
            procs.append(proc)
            addrs.append(ready["address"])
        async with Discovery(static=addrs, mdns=False) as browser:
            kinds = []
            for _ in range(10):
                event = await browser.next_event(2.0)
                if event is None:
                    break
                kinds.append((event.kind, event.detail))
                if event.kind == "conflict":
                    break
        assert [k for k, _ in kinds][:2] == ["up", "conflict"]
        assert "fresh --state-dir" in kinds[1][1]
        assert len(browser.up) == 1
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)
