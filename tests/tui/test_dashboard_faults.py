"""The dashboard runs a short benchmark, injects a fault, shows the recovery, heals."""

from __future__ import annotations

import asyncio

import pytest

from console import ops
from console.client import NodeClient
from console.monitor import ClusterMonitor
from console.tui.app import ClusterApp
from console.tui.screens import FaultScreen
from tests.helpers import addresses, eventually

pytestmark = pytest.mark.cluster


async def test_bench_fault_recovery_and_heal_from_the_dashboard(small_cluster):
    cluster = await asyncio.to_thread(small_cluster, 3, node_args=["--no-advertise",
                                                                   "--allow-faults"])
    addrs = addresses(cluster)
    clients = [NodeClient(a) for a in addrs]
    await ops.load_plan(clients, "synthetic:tiny", "", 0, "uniform", progress=lambda m: None)
    monitor = ClusterMonitor(addrs, mdns=False, hz=4)
    app = ClusterApp(monitor)
    async with app.run_test(size=(140, 45)) as pilot:
        await eventually(lambda: sum(v.state == "up" for v in monitor.nodes.values()) == 3,
                    10, "3 nodes up")
        await eventually(lambda: monitor.plan() is not None, 10, "the plan")

        await pilot.press("b")  # short benchmark: the latency window fills
        await eventually(lambda: any(e.kind == "bench" and "tok/s" in e.text
                                       for e in monitor.events), 60, "the benchmark")
        await eventually(lambda: monitor.window("token_latency").total >= 12 * 30, 10,
                    "latency samples from the benchmark")

        # latency on the middle node, then heal it
        table = app.query_one("#nodes")
        table.move_cursor(row=table.get_row_index(addrs[1]))
        await pilot.press("f")
        assert isinstance(app.screen, FaultScreen)
        await pilot.click("#inject")
        await eventually(lambda: any(e.kind == "fault" and "latency injected" in e.text
                                       for e in monitor.events), 10, "the fault event")
        info = await clients[1].info()
        assert [f.spec.kind for f in info.faults] == ["latency"]
        await pilot.press("h")
        await eventually(lambda: any(e.kind == "fault" and "healed" in e.text
                                       for e in monitor.events), 10, "the heal event")
        assert not (await clients[1].info()).faults

        # kill the last node from the dashboard: it goes down and the plan recovers
        table.move_cursor(row=table.get_row_index(addrs[2]))
        await pilot.press("f")
        app.screen.query_one("#kind").value = "kill"
        await pilot.click("#inject")
        await eventually(lambda: monitor.nodes[addrs[2]].state == "down", 10, "down")
        await eventually(lambda: any(e.kind == "recovery" for e in monitor.events), 15,
                    "the recovery event")
        await eventually(lambda: monitor.plan() is not None
                    and len(monitor.plan().shards) == 2, 10, "the new plan")
        assert app.is_running
    for c in clients:
        await c.close()
