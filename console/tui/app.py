"""`mlx-cluster` with no arguments: a live dashboard of the cluster.

Rendering is decoupled from data: the ClusterMonitor (console/monitor.py) collects
metrics at the nodes' rate, and a 2 Hz timer repaints only when something changed (16
nodes at 10 Hz cost the console ~12% of a core: tests/bench/tui_load.py). Network calls
run in workers; results come back to the UI thread as state changes and messages, so
the UI never blocks.
"""

from __future__ import annotations

from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import DataTable, Footer, Header

from console.client import ClusterError
from console.tui.commands import ClusterCommands
from console.tui.screens import (
    GenerateScreen,
    HelpScreen,
    LoadScreen,
    NodeDetailScreen,
    SourceScreen,
)
from console.tui.widgets import (
    EventsPanel,
    HopPanel,
    LatencyPanel,
    NodesTable,
    PartitionBar,
    ThroughputPanel,
    ThroughputSpark,
)

NARROW = 100


class ClusterApp(App):
    TITLE = "mlx-cluster"
    CSS_PATH = "console.tcss"
    COMMANDS = App.COMMANDS | {ClusterCommands}
    BINDINGS = [
        Binding("l", "load", "Load", id="load", tooltip="plan and load a model"),
        Binding("g", "generate", "Generate", id="generate", tooltip="stream tokens"),
        Binding("u", "unload", "Unload", id="unload"),
        Binding("d", "detail", "Details", id="detail"),
        Binding("s", "source", "Source", id="source"),
        Binding("question_mark", "help", "Help", id="help"),
        Binding("q", "quit", "Quit", id="quit"),
    ]

    def __init__(self, monitor, start_monitor: bool = True, refresh_hz: float = 2.0) -> None:
        super().__init__()
        self.monitor = monitor
        self.start_monitor = start_monitor
        self.refresh_hz = refresh_hz
        self._dirty = True

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="top"):
            yield NodesTable(id="nodes")
            with Vertical(id="side"):
                yield PartitionBar(id="partition")
                yield ThroughputPanel(id="throughput")
                yield ThroughputSpark([0.0], id="spark")
        with Horizontal(id="bottom"):
            yield LatencyPanel(id="latency")
            with Vertical(id="right"):
                yield HopPanel(id="hops")
                yield EventsPanel(id="events")
        yield Footer()

    async def on_mount(self) -> None:
        self.query_one("#nodes").border_title = "Nodes"
        self.query_one("#hops").border_title = "Hops"
        self.query_one("#events").border_title = "Events"
        self.query_one("#throughput").border_title = "Throughput"
        self.monitor.on_change(self._mark_dirty)
        self.set_interval(1 / self.refresh_hz, self._repaint)
        self._apply_width(self.size.width)
        if self.start_monitor:
            await self.monitor.start()
        self._repaint(force=True)

    async def on_unmount(self) -> None:
        if self.start_monitor:
            await self.monitor.stop()

    def on_resize(self, event) -> None:
        self._apply_width(event.size.width)

    def _apply_width(self, width: int) -> None:
        self.screen.set_class(width < NARROW, "-narrow")

    def _mark_dirty(self) -> None:
        self._dirty = True

    def _repaint(self, force: bool = False) -> None:
        if not (self._dirty or force):
            return
        self._dirty = False
        with self.batch_update():
            for selector in ("#nodes", "#partition", "#throughput", "#spark", "#latency",
                             "#hops", "#events"):
                self.query_one(selector).refresh_from(self.monitor)

    # ------------------------------------------------------------ actions

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    def action_load(self) -> None:
        def chosen(result: str | None) -> None:
            if result:
                model, strategy = result.split("|", 1)
                self.load_model(model, strategy)

        self.push_screen(LoadScreen(self.monitor), chosen)

    @work(exclusive=True, group="load")
    async def load_model(self, model: str, strategy: str) -> None:
        from console.cli import load_plan

        self.monitor.log("load", f"loading {model} ({strategy}) ...")
        self.notify(f"loading {model} ...", timeout=3)
        try:
            plan, shards = await load_plan(self.monitor.up_clients(), model, "", 0, strategy,
                                           progress=lambda m: self.monitor.log("load", m.strip()))
        except ClusterError as e:
            self.monitor.log("error", f"load failed: {e}")
            self.notify(str(e), severity="error", timeout=8)
            return
        await self.monitor.refresh_infos()
        self.monitor.log("load", f"{model} loaded as epoch {plan.epoch} on "
                                 f"{len(plan.shards)} nodes")

    def action_generate(self) -> None:
        self.push_screen(GenerateScreen(self.monitor))

    @work(exclusive=True, group="unload")
    async def action_unload(self) -> None:
        import asyncio

        clients = self.monitor.up_clients()
        results = await asyncio.gather(*(c.unload() for c in clients), return_exceptions=True)
        failed = [str(r) for r in results if isinstance(r, BaseException)]
        await self.monitor.refresh_infos()
        self.monitor.log("error" if failed else "load",
                         "unload failed: " + "; ".join(failed) if failed
                         else f"unloaded {sum(bool(r) for r in results)} shard(s)")

    def action_detail(self) -> None:
        table = self.query_one("#nodes", DataTable)
        if not table.row_count:
            return
        key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
        view = self.monitor.nodes.get(key)
        if view is not None:
            self.push_screen(NodeDetailScreen(view))

    @on(DataTable.RowSelected, "#nodes")
    def row_selected(self) -> None:
        self.action_detail()

    def action_source(self) -> None:
        current = "zeroconf" if self.monitor.mdns else ",".join(self.monitor.static)

        def chosen(value: str | None) -> None:
            if value:
                self.switch_source(value)

        self.push_screen(SourceScreen(current), chosen)

    @work(exclusive=True, group="source")
    async def switch_source(self, value: str) -> None:
        if value == "zeroconf":
            await self.monitor.switch_source(None, True)
        else:
            await self.monitor.switch_source([a.strip() for a in value.split(",") if a.strip()],
                                             False)


def run_dashboard(addresses: list[str] | None, mdns: bool, client_options: dict,
                  interfaces: list[str] | None = None) -> int:
    from console.monitor import ClusterMonitor

    monitor = ClusterMonitor(addresses, mdns=mdns, interfaces=interfaces,
                             client_options=client_options)
    ClusterApp(monitor).run()
    return 0
