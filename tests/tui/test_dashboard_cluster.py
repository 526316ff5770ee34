"""The dashboard driven with Pilot against a real 3-node local cluster."""

from __future__ import annotations

import asyncio
import os
import re
import signal

import pytest
from textual.widgets import Static

from console.monitor import ClusterMonitor
from console.tui.app import ClusterApp
from console.tui.screens import GenerateScreen, LoadScreen
from console.tui.widgets import LatencyPanel, PartitionBar, ThroughputPanel
from tests.helpers import addresses, eventually

pytestmark = pytest.mark.cluster


async def test_dashboard_against_a_real_cluster(small_cluster):
    cluster = await asyncio.to_thread(small_cluster, 3, node_args=["--no-advertise"])
    addrs = addresses(cluster)
    monitor = ClusterMonitor(addrs, mdns=False, hz=4)
    app = ClusterApp(monitor)
    async with app.run_test(size=(140, 45)) as pilot:
        await eventually(lambda: sum(v.state == "up" for v in monitor.nodes.values()) == 3,
                         10, "3 nodes up")

        await pilot.press("l")
        assert isinstance(app.screen, LoadScreen)
        await pilot.click("#preview-button")
        await eventually(lambda: not app.screen.query_one("#load-button").disabled, 60,
                    "the plan preview")
        await pilot.click("#load-button")
        await eventually(lambda: monitor.plan() is not None
                    and monitor.plan().model == "smollm2-135m", 120, "the model to load")
        plan = monitor.plan()
        ranges = [(s.start_layer, s.end_layer) for s in plan.shards]
        assert ranges[0][0] == 0 and ranges[-1][1] == 29 and len(ranges) == 3
        assert all(a[1] + 1 == b[0] for a, b in zip(ranges, ranges[1:]))
        await pilot.pause(0.5)
        bar = app.query_one(PartitionBar)
        assert "smollm2-135m" in bar.border_title
        assert "29" in str(bar.render())

        before_tokens = monitor.tokens_total
        await pilot.press("g")
        assert isinstance(app.screen, GenerateScreen)
        await pilot.click("#go")
        await eventually(lambda: "tok/s" in str(app.screen.query_one("#stats").render()),
                    60, "the generation to finish")
        assert "Paris" in app.screen.text
        await pilot.press("escape")
        await eventually(lambda: monitor.window("token_latency").total > 0
                    and monitor.tokens_total > before_tokens, 10, "latency and throughput")
        await pilot.pause(0.5)
        assert "n=0" not in app.query_one(LatencyPanel).border_title
        text = app.query_one(ThroughputPanel).query_one("#throughput-text", Static)
        shown = re.search(r"total (\d+)", str(text.render()))
        assert shown and int(shown.group(1)) > before_tokens
        # the generated prompt's KV is in the shards' prefix caches now
        await eventually(lambda: (m := re.search(r"prefix cache (\d+\.\d) MiB",
                                                 str(text.render()))) and float(m.group(1)) > 0,
                         10, "the prefix caches to show the prompt held")

        victim = cluster["nodes"][2]
        os.kill(victim["pid"], signal.SIGKILL)
        await eventually(lambda: monitor.nodes[victim["address"]].state == "down", 10,
                    "the killed node to show as down")
        assert any(e.kind == "down" and victim["address"] in e.text for e in monitor.events)
        await pilot.pause(0.5)
        assert app.is_running
        row = app.query_one("#nodes").get_row(victim["address"])
        assert "down" in str(row[2])
