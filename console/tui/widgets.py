"""Dashboard panels. Each renders state from a MonitorSource (console/monitor.py: the
ClusterMonitor, or the seeded fake in tests); none of them does I/O."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import DataTable, Sparkline, Static
from textual_plotext import PlotextPlot

from node.histogram import Histogram
from node.plan import GIB

if TYPE_CHECKING:
    from console.monitor import MonitorSource

COLOURS = ["#4e9a06", "#3465a4", "#c4a000", "#75507b", "#06989a", "#cc0000", "#ce5c00",
           "#8ae234", "#729fcf", "#fce94f", "#ad7fa8", "#34e2e2", "#ef2929", "#fcaf3e",
           "#888a85", "#5c3566"]
STATE_STYLE = {"up": "bold green", "suspect": "bold yellow", "down": "bold red",
               "connecting": "dim"}


def colour_for(index: int) -> str:
    return COLOURS[index % len(COLOURS)]


def memory_bar(used: int, budget: int, width: int = 6) -> Text:
    frac = min(1.0, used / budget) if budget else 0.0
    filled = round(frac * width)
    style = "green" if frac < 0.75 else "yellow" if frac < 0.95 else "red"
    bar = Text("█" * filled, style=style) + Text("░" * (width - filled), style="dim")
    return bar + Text(f" {used / GIB:.1f}/{budget / GIB:.0f}G")


def busy_text(fraction: float) -> Text:
    """The share of the last interval a node spent computing (cyan once it is most of it)."""
    return Text(f"{fraction:.0%}", style="cyan" if fraction >= 0.5 else "")


class NodesTable(DataTable):
    """One row per node, updated in place by row key (the node's address). A star marks
    the node that coordinates the plan's re-plans (its first live member)."""

    COLUMNS = ("node", "address", "state", "memory", "cpu%", "layers", "busy", "µb", "tok/s",
               "beat")

    def on_mount(self) -> None:
        self._shown: dict[tuple[str, str], str] = {}  # (row, column) -> text on screen
        self.cursor_type = "row"
        self.zebra_stripes = True
        for column in self.COLUMNS:
            self.add_column(column, key=column)

    def refresh_from(self, monitor: MonitorSource) -> None:
        plan = monitor.plan()
        order = {s.node_id: i for i, s in enumerate(plan.shards)} if plan else {}
        coordinator = monitor.coordinator()
        self.border_subtitle = "★ coordinator" if coordinator else ""
        for address, view in monitor.nodes.items():
            snap, info = view.snapshot, view.info
            used = snap.mlx_active_bytes if snap else (info.mlx_active_bytes if info else 0)
            budget = (snap.memory_budget if snap else 0) or (
                info.capabilities.memory_budget if info else 0)
            shard = info.shard if info is not None and info.HasField("shard") else None
            colour = colour_for(order.get(view.node_id, 0)) if shard else "dim"
            split = (f" ÷{shard.ring.size}" if shard is not None and shard.HasField("ring")
                     and shard.ring.parallel == "tensor" else "")
            layers = Text(f"{shard.start_layer}-{shard.end_layer}{split}" if shard else "—",
                          style=colour)
            age = view.heartbeat_age
            cells = {
                "node": Text.assemble((view.label, "bold"), (
                    " ★" if coordinator and view.node_id == coordinator else "", "bold yellow")),
                "address": address,
                "state": state_text(view, monitor.has_token),
                "memory": memory_bar(used, budget),
                "cpu%": f"{snap.cpu_percent:.0f}" if snap else "—",
                "layers": layers,
                # the share of time it computed forwards, and the micro-batches it holds:
                # one batch in lockstep leaves each of N nodes busy about 1/N of the time
                "busy": busy_text(snap.busy_fraction) if snap and shard else "—",
                "µb": str(snap.microbatches) if snap and shard else "—",
                "tok/s": f"{view.tokens_per_s:.1f}" if snap else "—",
                "beat": ("<1s" if age < 1 else f"{age:.0f}s") if age != float("inf") else "—",
            }
            if address not in self.rows:
                self.add_row(*cells.values(), key=address)
                self.sort("node", key=lambda cell: str(cell))
                self._shown.update({(address, c): str(v) for c, v in cells.items()})
                continue
            # touch only the cells whose text changed; re-measure only when it grew
            for column, value in cells.items():
                text, old = str(value), self._shown.get((address, column), "")
                if text != old:
                    self.update_cell(address, column, value, update_width=len(text) > len(old))
                    self._shown[(address, column)] = text


def state_text(view, has_token: bool) -> Text:
    """A node's state, and how it is guarded when that needs saying: open (off loopback
    with no token: anyone may change it) or token needed (this console has none)."""
    text = Text(view.state, style=STATE_STYLE.get(view.state, ""))
    info = view.info
    if info is not None and info.insecure:
        text.append(" open", style="bold red")
    elif info is not None and info.auth_required and not has_token:
        text.append(" token needed", style="bold yellow")
    return text


class Rerendered(Static):
    """A Static that renders again from the last monitor when its size changes."""

    _monitor: MonitorSource | None = None

    def refresh_from(self, monitor: MonitorSource) -> None:
        self._monitor = monitor
        self.render_from(monitor)

    def on_resize(self) -> None:
        if self._monitor is not None:
            self.render_from(self._monitor)

    def render_from(self, monitor: MonitorSource) -> None:
        raise NotImplementedError


class PartitionBar(Rerendered):
    """All layers of the loaded model as one bar, each node's range in its colour."""

    def render_from(self, monitor: MonitorSource) -> None:
        plan = monitor.plan()
        if plan is None:
            self.border_title = "Partition"
            self.update(Text("no model loaded — press l to load one", style="dim"))
            return
        backend = "pipeline" if plan.backend in ("", "pipeline") else (
            f"{plan.backend}:{plan.parallel}")
        self.border_title = (f"Partition · {plan.model} · {backend} · "
                             f"{plan.strategy or 'plan'} · epoch {plan.epoch}")
        width = max(10, self.size.width - 4)
        tensor = plan.backend == "mlx-ring" and plan.parallel == "tensor"
        bar = tensor_bar(plan, width) if tensor else layer_list_bar(plan, width)
        labels = Text()
        for i, shard in enumerate(plan.shards if not tensor else plan.shards[:1]):
            a = round(shard.start_layer * width / plan.n_layers)
            b = round((shard.end_layer + 1) * width / plan.n_layers)
            labels.append(f"{shard.start_layer}".ljust(max(1, b - a)),
                          style=colour_for(i) if not tensor else "")
        lines = [bar, labels + Text(f"{plan.n_layers - 1}")]
        resident = {v.node_id: v for v in monitor.nodes.values()}
        n = len(plan.shards)
        for i, shard in enumerate(plan.shards):
            view = resident.get(shard.node_id)
            used = view.snapshot.mlx_active_bytes if view and view.snapshot else 0
            est = shard.param_bytes + shard.kv_bytes
            part = (f" r{i} 1/{n} each" if tensor else
                    f" {shard.start_layer:>3}-{shard.end_layer:<3}")
            lines.append(Text.assemble(
                ("■ ", colour_for(i)), (f"{(view.label if view else shard.address)[:10]:10}",),
                f"{part} est {est / GIB:.2f}G", (f" res {used / GIB:.2f}G", "dim")))
        self.update(Text("\n").join(lines))


def layer_list_bar(plan, width: int) -> Text:
    """The layer list cut into contiguous ranges, one colour per node."""
    bar = Text()
    for i, shard in enumerate(plan.shards):
        a = round(shard.start_layer * width / plan.n_layers)
        b = round((shard.end_layer + 1) * width / plan.n_layers)
        bar.append("█" * max(1, b - a), style=colour_for(i))
    return bar


def tensor_bar(plan, width: int) -> Text:
    """Tensor parallel: every layer is split across all ranks, so each layer's slot of the
    bar is cut into one stripe per rank (as wide as the width allows)."""
    n = len(plan.shards)
    bar = Text()
    for x in range(width):
        position = x * plan.n_layers / width  # layer index + fraction within the layer
        rank = min(n - 1, int((position % 1.0) * n))
        bar.append("█", style=colour_for(rank))
    return bar


class LatencyPanel(PlotextPlot):
    """Histograms of inter-token latency and TTFT over the window, p50/p90/p99 marked."""

    _drawn: tuple = ()

    def refresh_from(self, monitor: MonitorSource) -> None:
        itl, ttft = monitor.window("token_latency"), monitor.window("ttft")
        drawn = (itl.total, itl.sum_s, ttft.total, ttft.sum_s, self.size)
        if drawn == self._drawn:
            return  # plotting is the costliest paint: skip it when nothing changed
        self._drawn = drawn
        plt = self.plt
        plt.clear_figure()
        self.border_title = (f"Latency · ITL p50 {ms(itl.percentile(50))} p90 "
                             f"{ms(itl.percentile(90))} p99 {ms(itl.percentile(99))} · TTFT p50 "
                             f"{ms(ttft.percentile(50))} · n={itl.total}")
        xs, ys = histogram_bars(itl)
        if xs:
            plt.bar(xs, ys, color="cyan", label="inter-token")
            for q, colour in ((50, "green"), (90, "orange"), (99, "red")):
                plt.vline(itl.percentile(q) * 1000, color=colour)
        xs2, ys2 = histogram_bars(ttft)
        if xs2:
            plt.bar(xs2, ys2, color="magenta", label="TTFT")
        everything = xs + xs2
        if everything:
            lo, hi = min(everything), max(everything)
            ticks = [lo + (hi - lo) * k / 4 for k in range(5)]
            plt.xticks(ticks, [f"{t:.0f}" if t >= 10 else f"{t:.1f}" for t in ticks])
        plt.xlabel("ms")
        plt.title("")
        self.refresh()


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}ms" if seconds else "—"


def histogram_bars(h: Histogram, max_bars: int = 40) -> tuple[list[float], list[int]]:
    """Bucket midpoints (ms) and counts of a histogram's occupied range."""
    from node.histogram import bucket_mid

    pairs = h.pairs()
    if not pairs:
        return [], []
    lo, hi = pairs[0][0], pairs[-1][0]
    step = max(1, (hi - lo + 1 + max_bars - 1) // max_bars)
    counts = dict(pairs)
    xs, ys = [], []
    for start in range(lo, hi + 1, step):
        xs.append(round(bucket_mid(start + step // 2) * 1000, 3))
        ys.append(sum(counts.get(i, 0) for i in range(start, start + step)))
    return xs, ys


class HopPanel(Static):
    """Per-hop (node pair) one-way latency and per-node compute."""

    def refresh_from(self, monitor: MonitorSource) -> None:
        rows = [Text.assemble((f"{a[:9]}→{b[:9]}", "bold"),
                              f" p50 {ms(h.percentile(50))} p99 {ms(h.percentile(99))}",
                              (f" n={h.total}", "dim"))
                for a, b, h in monitor.hop_series() if h.total]
        compute = monitor.window("step_compute")
        transfer = monitor.window("token_transfer")
        rows.append(Text(f"step compute p50 {ms(compute.percentile(50))} · transfer per token "
                         f"p50 {ms(transfer.percentile(50))}", style="dim"))
        self.update(Text("\n").join(rows))


class ThroughputPanel(Vertical):
    """Cluster tokens/s, totals and requests in flight over a sparkline of tokens/s: one
    bordered panel that holds both, so the sparkline is drawn inside its border."""

    def compose(self) -> ComposeResult:
        yield Static(id="throughput-text")
        yield ThroughputSpark([0.0], id="spark")

    def refresh_from(self, monitor: MonitorSource) -> None:
        now = monitor.throughput[-1][1] if monitor.throughput else 0.0
        up = [v for v in monitor.nodes.values() if v.state == "up"]
        # requests in flight: the plan's entry node holds every one (API or CLI alike)
        flight = max((v.snapshot.active_requests for v in up if v.snapshot), default=0)
        batch = max((v.batch for v in up), default=0.0)
        self.query_one("#throughput-text", Static).update(Text.assemble(
            ("tokens/s ", "dim"), (f"{now:6.1f}", "bold cyan"),
            ("  total ", "dim"), (f"{monitor.tokens_total}", "bold"),
            ("  nodes up ", "dim"), (f"{len(up)}/{len(monitor.nodes)}", "bold"),
            ("\nin flight ", "dim"), (f"{flight}", "bold"),
            ("  batch ", "dim"), (f"×{batch:.1f}" if batch else "—", "bold"),
            *prefix_cache_text(monitor)))


def prefix_cache_text(monitor: MonitorSource) -> tuple[tuple[str, str], ...]:
    """The shards' prefix caches: bytes held in all, and the hit rate of the requests'
    lookups (the entry node's: it chooses what every shard reuses)."""
    caches = [v.snapshot.shard.prompt_cache for v in monitor.nodes.values()
              if v.state == "up" and v.snapshot and v.snapshot.shard.HasField("prompt_cache")]
    if not caches:
        return ()
    held = sum(c.bytes for c in caches)
    # every request looks on the entry node; a later shard looks only when it reuses
    entry = max(caches, key=lambda c: c.lookups)
    return (("\nprefix cache ", "dim"), (f"{held / 2**20:.1f} MiB", "bold"),
            ("  hits ", "dim"),
            (f"{entry.hits / entry.lookups:.0%}" if entry.lookups else "—", "bold"))


class ThroughputSpark(Sparkline):
    """The cluster's tokens/s over the last 120 samples (ThroughputPanel holds it)."""

    def refresh_from(self, monitor: MonitorSource) -> None:
        self.data = [v for _, v in monitor.throughput][-120:] or [0.0]


class EventsPanel(Rerendered):
    """Discoveries, losses, plan changes, loads and errors: the newest that fit."""

    STYLES = {"up": "green", "down": "red", "suspect": "yellow", "error": "bold red",
              "load": "cyan", "info": "white", "recovery": "bold magenta",
              "join": "bold green", "fault": "bold yellow", "bench": "cyan"}

    def render_from(self, monitor: MonitorSource) -> None:
        region = self.content_region  # inside the border: what can show
        rows = max(1, region.height or 10)
        width = max(20, region.width or 78)
        lines: list[Text] = []
        for event in reversed(monitor.events):
            stamp = time.strftime("%H:%M:%S", time.localtime(event.at))
            line = Text.assemble((stamp + " ", "dim"),
                                 (f"{event.kind:8} ", self.STYLES.get(event.kind, "")),
                                 event.text)
            wrapped = line.wrap(self.app.console, width)
            lines[:0] = list(wrapped)
            if len(lines) >= rows:
                break
        self.update(Text("\n").join(lines[-rows:]))
