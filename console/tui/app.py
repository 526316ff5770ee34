"""`mlx-cluster` with no arguments: a live dashboard of the cluster.

Rendering is decoupled from data: the ClusterMonitor (console/monitor.py) collects
metrics at the nodes' rate, and a 2 Hz timer repaints only when something changed (16
nodes at 10 Hz cost the console ~12% of a core: tests/bench/tui_load.py). Network calls
run in workers; results come back to the UI thread as state changes and messages, so
the UI never blocks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.css.query import NoMatches
from textual.widgets import DataTable, Footer, Header

from console import ops
from console.client import ClusterError
from console.tui.commands import ClusterCommands
from console.tui.screens import (
    FaultScreen,
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
)

if TYPE_CHECKING:
    from console.monitor import MonitorSource

NARROW = 100
BENCH_REQUESTS = 12
BENCH_CONCURRENCY = 3


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
        Binding("b", "bench", "Bench", id="bench", tooltip="a short benchmark on the plan"),
        Binding("f", "fault", "Fault", id="fault", tooltip="inject a fault into the node"),
        Binding("h", "heal", "Heal", id="heal", tooltip="heal the selected node's faults"),
        Binding("question_mark", "help", "Help", id="help"),
        Binding("q", "quit", "Quit", id="quit"),
    ]

    def __init__(self, monitor: MonitorSource, start_monitor: bool = True,
                 refresh_hz: float = 2.0) -> None:
        super().__init__()
        self.monitor: MonitorSource = monitor
        self.start_monitor = start_monitor
        self.refresh_hz = refresh_hz
        self._dirty = True

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="top"):
            yield NodesTable(id="nodes")
            with Vertical(id="side"):
                yield PartitionBar(id="partition")
                yield ThroughputPanel(id="throughput")  # holds the sparkline, #spark
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
        try:
            widgets = [self.query_one(selector) for selector in (
                "#nodes", "#partition", "#throughput", "#spark", "#latency", "#hops",
                "#events")]
        except NoMatches:  # a timer that fires while the screen is built or torn down
            return
        with self.batch_update():
            for widget in widgets:
                widget.refresh_from(self.monitor)

    # ------------------------------------------------------------ actions

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    def action_load(self) -> None:
        def chosen(result: str | None) -> None:
            if result:
                model, strategy, backend = result.split("|", 2)
                self.load_model(model, strategy, backend)

        self.push_screen(LoadScreen(self.monitor), chosen)

    @work(exclusive=True, group="load")
    async def load_model(self, model: str, strategy: str, backend: str = "pipeline") -> None:
        self.monitor.log("load", f"loading {model} ({backend}, {strategy}) ...")
        self.notify(f"loading {model} ...", timeout=3)
        try:
            plan, shards = await ops.load_plan(
                self.monitor.up_clients(), model, "", 0, strategy,
                progress=lambda m: self.monitor.log("load", m.strip()), backend=backend)
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

    def selected(self):
        table = self.query_one("#nodes", DataTable)
        if not table.row_count:
            return None
        key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
        return self.monitor.nodes.get(key)

    def action_detail(self) -> None:
        view = self.selected()
        if view is not None:
            self.push_screen(NodeDetailScreen(view))

    def action_fault(self) -> None:
        view = self.selected()
        if view is None:
            return

        def chosen(spec) -> None:
            if spec is not None:
                self.inject(view.address, view.label, spec)

        self.push_screen(FaultScreen(view.label), chosen)

    @work(group="faults")
    async def inject(self, address: str, label: str, spec) -> None:
        client = next((c for c in self.monitor.up_clients() if c.address == address), None)
        try:
            if client is None:
                raise ClusterError(f"{label} is not up")
            await client.inject(spec)
        except ClusterError as e:
            if spec.kind != "kill":  # a killed node may not live to answer
                self.monitor.log("error", f"inject {spec.kind} on {label}: {e}")
                self.notify(str(e), severity="error", timeout=8)
                return
        self.monitor.log("fault", f"{spec.kind} injected on {label}")

    @work(group="faults")
    async def action_heal(self) -> None:
        view = self.selected()
        if view is None:
            return
        client = next((c for c in self.monitor.up_clients() if c.address == view.address), None)
        try:
            if client is None:
                raise ClusterError(f"{view.label} is not up")
            await client.heal()
        except ClusterError as e:
            self.monitor.log("error", f"heal {view.label}: {e}")
            return
        self.monitor.log("fault", f"{view.label} healed")

    @work(exclusive=True, group="bench")
    async def action_bench(self) -> None:
        """A short benchmark on the loaded plan: the latency panels fill as it runs."""
        import asyncio

        from console.workload import Route, run_level, summarise, workload_prompts

        clients = self.monitor.up_clients()
        try:
            _, entry = await ops.entry_client(clients)
        except ClusterError as e:
            self.notify(str(e), severity="error")
            return
        prompts = await asyncio.to_thread(workload_prompts, entry.plan.model, BENCH_REQUESTS,
                                          32, 0)
        self.monitor.log("bench", f"benchmark: {BENCH_REQUESTS} requests x 32 tokens, "
                                  f"concurrency {BENCH_CONCURRENCY} ...")

        def progress(done: int, total: int) -> None:
            self.sub_title = f"benchmark {done}/{total}"

        results, wall = await run_level(Route(clients), prompts, 32, BENCH_CONCURRENCY, 120.0,
                                        progress)
        s = summarise(results, wall, BENCH_CONCURRENCY)
        self.sub_title = ""
        self.monitor.log("bench", f"benchmark: {s['aggregate_tokens_per_s']:.1f} tok/s, TTFT "
                                  f"p50 {s['ttft_s']['p50'] * 1000:.0f} ms, ITL p99 "
                                  f"{s['itl_s']['p99'] * 1000:.0f} ms, success "
                                  f"{s['success_rate']:.0%}")

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


def run_dashboard(addresses: list[str] | None, mdns: bool, connection: ops.Connection,
                  interfaces: list[str] | None = None) -> int:
    from console.monitor import ClusterMonitor

    monitor = ClusterMonitor(addresses, mdns=mdns, interfaces=interfaces,
                             client_options=connection.options())
    ClusterApp(monitor).run()
    return 0
