"""Modal screens: load (with plan preview), generate, node detail, discovery source, help."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Checkbox, Input, Label, Markdown, Select, Static

from console import ops
from console.client import ClusterError, gather_infos, to_dict
from node.faults import KINDS as FAULTS
from node.plan import BACKENDS, DEFAULT_STRATEGY, GIB
from node.plan import STRATEGIES as ALL_STRATEGIES

STRATEGIES = [s for s in ALL_STRATEGIES if not s.startswith("manual")]  # (typed, not picked)


class LoadScreen(ModalScreen[str | None]):
    """Model spec, backend and strategy, a plan preview from the live nodes, then confirm."""

    BINDINGS = [("escape", "dismiss(None)", "Cancel")]

    def __init__(self, monitor, model: str = "smollm2-135m") -> None:
        super().__init__()
        self.monitor = monitor
        self.model = model
        self.previewed: tuple[str, str] | None = None

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label("Load a model across the cluster", classes="title")
            yield Input(self.model, placeholder="smollm2-135m, synthetic:tiny, a dir ...",
                        id="model")
            with Horizontal(classes="choices"):
                yield Select([(b, b) for b in BACKENDS], value="pipeline", allow_blank=False,
                             id="backend")
                yield Select([(s, s) for s in STRATEGIES], value=DEFAULT_STRATEGY,
                             allow_blank=False, id="strategy")
            yield Static("press Preview to see the plan", id="preview")
            with Horizontal(classes="buttons"):
                yield Button("Preview", id="preview-button")
                yield Button("Load", id="load-button", variant="primary", disabled=True)
                yield Button("Cancel", id="cancel-button")

    def _choice(self) -> tuple[str, str, str]:
        return (self.query_one("#model", Input).value.strip(),
                str(self.query_one("#strategy", Select).value),
                str(self.query_one("#backend", Select).value))

    @on(Button.Pressed, "#cancel-button")
    def cancel(self) -> None:
        self.dismiss(None)

    @on(Button.Pressed, "#preview-button")
    @on(Input.Submitted, "#model")
    def preview(self) -> None:
        self.query_one("#preview", Static).update(Text("planning ...", style="dim"))
        self.run_preview(*self._choice())

    @work(exclusive=True, group="preview")
    async def run_preview(self, model: str, strategy: str, backend: str) -> None:
        infos = [i for i in await gather_infos(self.monitor.up_clients())
                 if not isinstance(i, ClusterError)]
        try:
            if not infos:
                raise ClusterError("no node is up")
            plan, source = ops.partition(infos, model, "", 0, strategy, backend)
        except ClusterError as e:
            self.query_one("#preview", Static).update(Text(str(e), style="bold red"))
            self.query_one("#load-button", Button).disabled = True
            return
        tensor = backend == "mlx-ring:tensor"
        table = Table(title=f"{model} · {plan.n_layers} layers · {backend} · {plan.strategy}",
                      expand=True)
        for column in ("node", "layers", "weights", "kv", "total", "budget"):
            table.add_column(column)
        n = len(plan.shards)
        for s in plan.shards:
            layers = f"1/{n} of {s.start}-{s.end}" if tensor else f"{s.start}-{s.end}"
            table.add_row(s.node.label, layers, f"{s.param_bytes / GIB:.2f} GiB",
                          f"{s.kv_bytes / GIB:.2f} GiB", f"{s.total_bytes / GIB:.2f} GiB",
                          f"{s.node.budget / GIB:.2f} GiB")
        self.query_one("#preview", Static).update(table)
        self.previewed = (model, strategy, backend)
        self.query_one("#load-button", Button).disabled = False

    @on(Button.Pressed, "#load-button")
    def confirm(self) -> None:
        if self.previewed == self._choice():
            self.dismiss("|".join(self.previewed))
        else:
            self.preview()  # the choice changed since the preview


class GenerateScreen(ModalScreen[None]):
    """A prompt; tokens stream into the panel as the cluster produces them."""

    BINDINGS = [("escape", "dismiss(None)", "Close")]

    def __init__(self, monitor, prompt: str = "What is the capital of France?") -> None:
        super().__init__()
        self.monitor = monitor
        self.prompt = prompt

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label("Generate", classes="title")
            yield Input(self.prompt, id="prompt")
            with Horizontal(classes="buttons"):
                yield Checkbox("chat template", value=True, id="chat")
                yield Button("Generate", id="go", variant="primary")
                yield Button("Close", id="close")
            with VerticalScroll(id="output-box"):
                yield Static("", id="output")
            yield Static("", id="stats")

    @on(Button.Pressed, "#close")
    def close(self) -> None:
        self.dismiss(None)

    @on(Button.Pressed, "#go")
    @on(Input.Submitted, "#prompt")
    def go(self) -> None:
        self.text = ""
        self.query_one("#output", Static).update("")
        self.query_one("#stats", Static).update(Text("generating ...", style="dim"))
        self.stream(self.query_one("#prompt", Input).value,
                    self.query_one("#chat", Checkbox).value)

    @work(exclusive=True, group="generate")
    async def stream(self, prompt: str, chat: bool) -> None:
        from protos import cluster_pb2 as pb

        def show(piece: str) -> None:
            self.text += piece
            self.query_one("#output", Static).update(self.text)

        request = pb.GenerateRequest(prompt=prompt, chat=chat, max_tokens=64)
        try:
            result = await ops.generate(self.monitor.up_clients(), request, show)
        except ClusterError as e:
            self.query_one("#stats", Static).update(Text(str(e), style="bold red"))
            self.monitor.log("error", f"generate: {e}")
            return
        stats = (f"{result.completion_tokens} tokens · {result.finish_reason} · TTFT "
                 f"{result.ttft_s * 1000:.0f} ms · {result.tokens_per_s:.1f} tok/s · "
                 f"{len(result.shards)} shards")
        self.query_one("#stats", Static).update(Text(stats, style="green"))
        self.monitor.log("info", f"generated {stats}")


def readable(key: str, value) -> str:
    if isinstance(value, int) and (key.startswith("memory") or key.endswith("bytes")):
        return f"{value / GIB:.2f} GiB"
    return str(value)


class NodeDetailScreen(ModalScreen[None]):
    BINDINGS = [("escape", "dismiss(None)", "Close")]

    def __init__(self, view) -> None:
        super().__init__()
        self.view = view

    def compose(self) -> ComposeResult:
        view = self.view
        lines = [f"# {view.label}", f"address `{view.address}` · id `{view.node_id}` · "
                 f"state **{view.state}**", ""]
        if view.info is not None:
            lines += [f"protocol version {view.info.protocol_version or '—'} · plan coordinated "
                      f"by `{view.info.coordinator or '—'}`", ""]
            caps = to_dict(view.info.capabilities)
            lines += ["| capability | value |", "|---|---|"]
            lines += [f"| {k} | {readable(k, v)} |" for k, v in caps.items()]
            if view.info.HasField("shard"):
                shard = to_dict(view.info.shard)
                ring = shard.pop("ring", {})
                lines += ["", "| shard | value |", "|---|---|"]
                lines += [f"| {k} | {readable(k, v)} |" for k, v in shard.items()]
                if ring:  # the mlx-ring worker this node started
                    lines += ["", "| mlx-ring worker | value |", "|---|---|"]
                    lines += [f"| {k} | {readable(k, v)} |" for k, v in ring.items()]
        if view.cpu:
            recent = list(view.cpu)[-20:]
            lines += ["", f"CPU % (last {len(recent)} snapshots): "
                      + " ".join(f"{c:.0f}" for c in recent)]
        with VerticalScroll(id="dialog"):
            yield Markdown("\n".join(lines))
            yield Button("Close", id="close")

    @on(Button.Pressed, "#close")
    def close(self) -> None:
        self.dismiss(None)


class FaultScreen(ModalScreen):
    """Pick a fault and its parameters for the selected node (needs --allow-faults)."""

    BINDINGS = [("escape", "dismiss(None)", "Cancel")]

    def __init__(self, label: str) -> None:
        super().__init__()
        self.label = label

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label(f"Inject a fault into {self.label}", classes="title")
            yield Select([(f, f) for f in FAULTS], value="latency", allow_blank=False,
                         id="kind")
            yield Input("ms=50 duration=30", id="params",
                        placeholder="ms=50 jitter=5 p=0.1 factor=3 kbps=100 gib=1 duration=30 "
                                    "peers=ID,ID direction=both")
            with Horizontal(classes="buttons"):
                yield Button("Inject", id="inject", variant="error")
                yield Button("Cancel", id="cancel")

    @on(Button.Pressed, "#cancel")
    def cancel(self) -> None:
        self.dismiss(None)

    @on(Button.Pressed, "#inject")
    @on(Input.Submitted, "#params")
    def inject(self) -> None:
        from protos import cluster_pb2 as pb

        spec = pb.FaultSpec(kind=str(self.query_one("#kind", Select).value))
        names = {"ms": "ms", "jitter": "jitter_ms", "p": "p", "factor": "factor",
                 "kbps": "kbps", "gib": "gib", "duration": "duration_s"}
        for part in self.query_one("#params", Input).value.split():
            key, _, value = part.partition("=")
            if key == "peers":  # partition: node ids or addresses
                spec.peers.extend(p for p in value.split(",") if p)
            elif key == "direction":
                spec.direction = value
            elif key in names:
                try:
                    setattr(spec, names[key], float(value))
                except ValueError:
                    self.notify(f"{part}: not a number", severity="error")
                    return
        self.dismiss(spec)


class SourceScreen(ModalScreen[str | None]):
    """Switch discovery: 'zeroconf', or a comma-separated list of host:port."""

    BINDINGS = [("escape", "dismiss(None)", "Cancel")]

    def __init__(self, current: str) -> None:
        super().__init__()
        self.current = current

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label("Discovery source: 'zeroconf' or host:port,host:port", classes="title")
            yield Input(self.current, id="source")
            with Horizontal(classes="buttons"):
                yield Button("Use", id="use", variant="primary")
                yield Button("Cancel", id="cancel")

    @on(Button.Pressed, "#use")
    @on(Input.Submitted, "#source")
    def use(self) -> None:
        self.dismiss(self.query_one("#source", Input).value.strip())

    @on(Button.Pressed, "#cancel")
    def cancel(self) -> None:
        self.dismiss(None)


HELP = """\
# mlx-cluster dashboard

| key | action |
|---|---|
| `l` | load a model (plan preview first) |
| `g` | generate: tokens stream into the panel |
| `u` | unload the model from every node |
| `enter` / `d` | details of the selected node |
| `s` | switch the discovery source |
| `b` | a short benchmark on the loaded plan (latency panels fill as it runs) |
| `f` / `h` | inject a fault into / heal the selected node (`--allow-faults` nodes) |
| `ctrl+p` | command palette: every action by name |
| `?` | this help |
| `q` | quit |

Nodes: **up** (metrics arriving), **suspect** (none for 2 s), **down** (stream lost or
node said goodbye). Latency histograms cover the last 60 s of every node, merged.
"""


class HelpScreen(ModalScreen[None]):
    BINDINGS = [("escape", "dismiss(None)", "Close"), ("question_mark", "dismiss(None)", "")]

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="dialog"):
            yield Markdown(HELP)
            yield Button("Close", id="close")

    @on(Button.Pressed, "#close")
    def close(self) -> None:
        self.dismiss(None)
