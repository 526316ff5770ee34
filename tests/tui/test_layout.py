"""The dashboard's layout at many terminal sizes: the throughput sparkline is drawn inside
its panel's border, and the panel inside the column that holds it (nothing clips it).

A widget test with the seeded fake data source (no cluster): the app is run headless at
each size and the widgets' screen regions are compared.
"""

from __future__ import annotations

import pytest
from textual.geometry import Region

from console.tui.app import NARROW, ClusterApp
from tests.tui.fake import FakeMonitor

SIZES = [(160, 48), (80, 24), (200, 60), (120, 40), (100, 30), (100, 24), (110, 26),
         (240, 70), (60, 20)]
SOURCES = {"loaded": dict(), "empty": dict(loaded=False), "tensor": dict(tensor=True)}


def within(inner: Region, outer: Region) -> bool:
    return (inner.x >= outer.x and inner.y >= outer.y and inner.right <= outer.right
            and inner.bottom <= outer.bottom)


def check_sparkline(app: ClusterApp, size: tuple[int, int]) -> None:
    panel, spark = app.query_one("#throughput"), app.query_one("#spark")
    if size[0] < NARROW:
        assert not panel.display and spark.region.area == 0, f"{size}: narrow hides both"
        return
    assert spark.region.height == 3, f"{size}: sparkline {spark.region}"
    assert within(spark.region, panel.content_region), (
        f"{size}: sparkline {spark.region} outside its panel's content {panel.content_region}")
    side, top = app.query_one("#side"), app.query_one("#top")
    assert within(panel.region, side.region), f"{size}: panel {panel.region} outside {side.region}"
    assert within(side.region, top.region), f"{size}: column {side.region} outside {top.region}"
    assert within(top.region, app.screen.region)
    partition = app.query_one("#partition")
    assert not partition.region.overlaps(panel.region), f"{size}: partition over the panel"
    assert spark.parent is panel


@pytest.mark.parametrize("source", sorted(SOURCES))
@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
async def test_the_sparkline_stays_inside_its_panel(size, source):
    app = ClusterApp(FakeMonitor(**SOURCES[source]), start_monitor=False)
    async with app.run_test(size=size) as pilot:
        await pilot.pause()
        check_sparkline(app, size)


async def test_the_sparkline_stays_inside_its_panel_as_the_terminal_is_resized():
    app = ClusterApp(FakeMonitor(), start_monitor=False)
    async with app.run_test(size=SIZES[0]) as pilot:
        for size in [*SIZES[1:], SIZES[0]]:
            await pilot.resize_terminal(*size)
            await pilot.pause()
            check_sparkline(app, size)


async def test_the_throughput_panel_shows_the_prefix_caches_held_and_the_entry_hit_rate():
    from textual.widgets import Static

    app = ClusterApp(FakeMonitor(), start_monitor=False)
    async with app.run_test(size=SIZES[0]) as pilot:
        await pilot.pause()
        text = str(app.query_one("#throughput-text", Static).render())
        # 12 + 8 + 4 MiB held; the entry node (most lookups) found 30 of 40
        assert "prefix cache 24.0 MiB  hits 75%" in text, text
    app = ClusterApp(FakeMonitor(tensor=True), start_monitor=False)  # mlx-ring: no cache
    async with app.run_test(size=SIZES[0]) as pilot:
        await pilot.pause()
        assert "prefix cache" not in str(app.query_one("#throughput-text", Static).render())


async def test_the_nodes_table_says_which_node_is_open_and_which_needs_a_token():
    app = ClusterApp(FakeMonitor(guarded=True), start_monitor=False)
    async with app.run_test(size=SIZES[0]) as pilot:
        await pilot.pause()
        table = app.query_one("#nodes")
        states = [str(table.get_row(a)[2]) for a in app.monitor.static]
        assert states == ["up", "up token needed", "up open"]
