"""The dashboard's data layer, usable without any UI: nodes, plan, metrics, events.

A ClusterMonitor follows a discovery source (static addresses and/or zeroconf), keeps one
WatchMetrics stream per node, and turns what arrives into plain state: node rows (up /
suspect / down, memory, CPU, tokens/s, heartbeat age), the newest plan, sliding-window
latency histograms merged across nodes, a throughput history and an event log. The
Textual app only renders this state; tests and scripts can read it directly.
`MonitorSource` is what the dashboard (console/tui/) uses of it, and all it uses: the
widget tests' fake (tests/tui/fake.py) implements the same protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import grpc

from console.client import ClusterError, NodeClient
from console.discovery import Discovery, NodeEvent
from node.auth import read_token
from node.histogram import Histogram
from protos import cluster_pb2 as pb

SUSPECT_AFTER_S = 2.0
RETRY_S = 2.0
LATENCY_SERIES = ("token_latency", "ttft", "step_compute", "token_transfer")


@dataclass
class NodeView:
    address: str
    node_id: str = ""
    name: str = ""
    state: str = "connecting"  # connecting | up | suspect | down
    info: pb.NodeInfo | None = None
    snapshot: pb.MetricsSnapshot | None = None
    last_seen: float = 0.0  # monotonic time of the last snapshot
    tokens_per_s: float = 0.0
    batch: float = 0.0  # requests per forward in the last interval (continuous batching)
    cpu: deque = field(default_factory=lambda: deque(maxlen=240))

    @property
    def heartbeat_age(self) -> float:
        return time.monotonic() - self.last_seen if self.last_seen else float("inf")

    @property
    def label(self) -> str:
        return self.name or self.address


@dataclass
class Event:
    at: float
    kind: str
    text: str


@runtime_checkable
class MonitorSource(Protocol):
    """Exactly what the dashboard reads and calls on its data source: ClusterMonitor in the
    app, a seeded fake in the widget tests. Widgets only read; the app also logs, starts,
    stops, switches the discovery source and asks for clients to act on."""

    nodes: dict[str, NodeView]  # by address
    events: deque[Event]  # the newest events, oldest first
    throughput: deque[tuple[float, float]]  # (monotonic time, cluster tokens/s)
    tokens_total: int
    mdns: bool  # the discovery source: zeroconf and/or static addresses
    static: list[str]
    has_token: bool  # the console holds a cluster token (nodes that need one can be changed)

    def on_change(self, callback: Callable[[], None]) -> None: ...

    def log(self, kind: str, text: str) -> None: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def switch_source(self, addresses: list[str] | None, mdns: bool) -> None: ...

    async def refresh_infos(self) -> None: ...

    def plan(self) -> pb.Plan | None: ...

    def coordinator(self) -> str: ...

    def window(self, series: str) -> Histogram: ...

    def hop_series(self) -> list[tuple[str, str, Histogram]]: ...

    def up_clients(self) -> list[NodeClient]: ...


def recovery_event(r: pb.Recovery, labels: dict[str, str], plan: pb.Plan | None = None,
                   previous: str = "") -> tuple[str, str]:
    """(kind, text) of the event log's line for one re-plan: a join (who joined), or a
    recovery: who was lost, who noticed,
    who coordinates now (a takeover when `previous`, the old plan's coordinator where
    known, was among the lost), the new plan's epoch and ranges, how many requests
    resumed and how long each phase took. `labels` maps node ids to names."""
    def name(node_id: str) -> str:
        return labels.get(node_id, node_id[:8])

    ranges = (" " + ", ".join(f"{name(s.node_id)} {s.start_layer}-{s.end_layer}"
                               for s in plan.shards)) if plan is not None else ""
    if r.joined:  # a node came (back): no loss, no resumed requests
        joined = ", ".join(name(n) for n in r.joined)
        return "join", (f"{joined} joined: coordinator {name(r.coordinator)}; epoch "
                        f"{r.from_epoch}->{r.to_epoch}{ranges}; re-plan {r.replan_s:.2f} s, "
                        f"reload {r.reload_s:.2f} s")
    lost = ", ".join(name(n) for n in r.lost) or "a node"
    if r.error:
        return "error", f"recovery from the loss of {lost} failed: {r.error}"
    who = []
    if r.noticed_by:
        who.append(f"noticed by {name(r.noticed_by)}")
    if r.coordinator:
        took_over = previous in r.lost and previous != r.coordinator
        who.append(f"{name(r.coordinator)} took over as coordinator" if took_over
                   else f"coordinator {name(r.coordinator)}")
    timings = [f"detect {r.detect_s:.2f} s", f"re-plan {r.replan_s:.2f} s",
               f"reload {r.reload_s:.2f} s"]
    if r.first_token_s:
        timings.append(f"first token {r.first_token_s:.2f} s")
    parts = [f"{lost} lost" + (f": {', '.join(who)}" if who else ""),
             f"epoch {r.from_epoch}->{r.to_epoch}{ranges}",
             f"{r.resumed_requests} request{'s' if r.resumed_requests != 1 else ''} resumed",
             ", ".join(timings)]
    return "recovery", "; ".join(parts)


class ClusterMonitor:
    def __init__(self, addresses: list[str] | None = None, mdns: bool = False,
                 interfaces: list[str] | None = None, hz: float = 4.0, window_s: float = 60.0,
                 client_options: dict | None = None) -> None:
        self.static = list(addresses or [])
        self.mdns = mdns
        self.interfaces = interfaces
        self.hz = hz
        self.window_s = window_s
        self.client_options = client_options or {}
        # the token the clients send: given, or from the environment or `token new`'s file
        self.has_token = bool(self.client_options.get("token") or read_token())
        self.nodes: dict[str, NodeView] = {}
        self.events: deque[Event] = deque(maxlen=500)
        self.event_count = 0  # events ever logged (the deque keeps the newest)
        self.throughput: deque[tuple[float, float]] = deque(maxlen=600)
        self.tokens_total = 0
        self._windows: dict[str, deque[tuple[float, Histogram]]] = {}
        self._clients: dict[str, NodeClient] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        self._discovery: Discovery | None = None
        self._listeners: list[Callable[[], None]] = []
        self._tokens_by_node: dict[str, tuple[int, float]] = {}
        self._forwards_by_node: dict[str, tuple[int, int]] = {}
        self._recoveries_seen: dict[str, int] = {}
        self._recoveries_logged: set[tuple[int, tuple[str, ...]]] = set()
        self._coordinators: dict[int, str] = {}  # plan epoch -> the coordinator reported

    # ------------------------------------------------------------ lifecycle

    def on_change(self, callback: Callable[[], None]) -> None:
        self._listeners.append(callback)

    def _changed(self) -> None:
        for callback in self._listeners:
            callback()

    def log(self, kind: str, text: str) -> None:
        self.events.append(Event(time.time(), kind, text))
        self.event_count += 1
        self._changed()

    async def start(self) -> None:
        source = ("zeroconf" if self.mdns else "") + (
            (" + " if self.mdns and self.static else "") + f"{len(self.static)} static"
            if self.static else "")
        self.log("info", f"watching nodes from {source or 'nowhere'}")
        self._discovery = Discovery(self.static, self.mdns, self.interfaces,
                                    client_options=self.client_options)
        await self._discovery.start()
        self._tasks["discovery"] = asyncio.get_running_loop().create_task(self._follow())
        self._tasks["suspects"] = asyncio.get_running_loop().create_task(self._suspects())

    async def stop(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        if self._discovery is not None:
            await self._discovery.close()
        await asyncio.gather(*(c.close() for c in self._clients.values()),
                             return_exceptions=True)

    async def switch_source(self, addresses: list[str] | None, mdns: bool) -> None:
        """Follow another discovery source (the rows of nodes no longer named stay down)."""
        if self._discovery is not None:
            self._tasks.pop("discovery").cancel()
            await self._discovery.close()
        self.static, self.mdns = list(addresses or []), mdns
        self._discovery = Discovery(self.static, self.mdns, self.interfaces,
                                    client_options=self.client_options)
        await self._discovery.start()
        self._tasks["discovery"] = asyncio.get_running_loop().create_task(self._follow())
        self.log("info", "discovery source: " + ("zeroconf" if mdns else "static ")
                 + ", ".join(self.static))

    # ------------------------------------------------------------ discovery and watches

    async def _follow(self) -> None:
        assert self._discovery is not None
        async for event in self._discovery.events():
            self._on_discovery(event)

    def _on_discovery(self, event: NodeEvent) -> None:
        view = self.nodes.get(event.address)
        if event.kind == "conflict":
            self.log("error", f"{event.address}: {event.detail}")
            return
        if event.kind == "down":
            if view is not None and view.state != "down":
                view.state = "down"
                self.log("down", f"{view.label} ({event.address}) is down"
                         + (f": {event.detail}" if event.detail else ""))
            return
        info = event.info
        if view is None:
            view = self.nodes[event.address] = NodeView(event.address)
        if info is not None:
            self._note_recoveries(view, info)
        was = view.state
        if info is not None:
            view.node_id, view.name = info.node_id, info.name
            view.info = pb.NodeInfo()
            view.info.CopyFrom(info)  # our copy: snapshots update it, discovery keeps its own
        if event.kind == "up" and was != "up":
            view.state = "up"
            view.last_seen = time.monotonic()
            self.log("up", f"{view.label} ({event.address}) is up via {event.source}")
        elif event.kind == "changed" and info is not None:
            self.log("info", f"{view.label}: " + (
                f"{info.shard.model} layers {info.shard.start_layer}-{info.shard.end_layer} "
                f"(epoch {info.shard.epoch})" if info.HasField("shard") else "no shard"))
        if event.address not in self._tasks or self._tasks[event.address].done():
            self._tasks[event.address] = asyncio.get_running_loop().create_task(
                self._watch(event.address))
        self._changed()

    def _client(self, address: str) -> NodeClient:
        if address not in self._clients:
            self._clients[address] = NodeClient(address, **self.client_options)
        return self._clients[address]

    async def _watch(self, address: str) -> None:
        """One WatchMetrics stream per node, reopened while the node is known."""
        view = self.nodes[address]
        while True:
            try:
                call = self._client(address).stub.WatchMetrics(pb.WatchRequest(hz=self.hz))
                async for snap in call:
                    self._on_snapshot(view, snap)
            except grpc.aio.AioRpcError as e:
                if view.state != "down":
                    view.state = "down"
                    self.log("down", f"{view.label} ({address}) is down: {e.code().name}")
            await asyncio.sleep(RETRY_S)
            with contextlib.suppress(ClusterError):
                info = await self._client(address).info()
                view.info = info
                view.state = "up"
                self.log("up", f"{view.label} ({address}) is back")

    def _on_snapshot(self, view: NodeView, snap: pb.MetricsSnapshot) -> None:
        now = time.monotonic()
        if view.state in ("suspect", "down", "connecting"):
            if view.state != "connecting":
                self.log("up", f"{view.label} answers again")
            view.state = "up"
        view.snapshot, view.last_seen = snap, now
        view.cpu.append(snap.cpu_percent)
        tokens = snap.counters.get("tokens_generated", 0)
        prev, prev_t = self._tokens_by_node.get(view.address, (tokens, now))
        dt = max(snap.interval_s, 1e-3)
        view.tokens_per_s = max(0, tokens - prev) / dt if prev_t != now else 0.0
        self.tokens_total += max(0, tokens - prev)
        self._tokens_by_node[view.address] = (tokens, now)
        steps, rows = (snap.counters.get("forward_steps", 0),
                       snap.counters.get("forward_rows", 0))
        prev_steps, prev_rows = self._forwards_by_node.get(view.address, (steps, rows))
        view.batch = (rows - prev_rows) / (steps - prev_steps) if steps > prev_steps else 0.0
        self._forwards_by_node[view.address] = (steps, rows)
        if view.info is not None and snap.HasField("shard"):
            if snap.shard.epoch != view.info.plan.epoch and self._idle(f"info:{view.address}"):
                self._tasks[f"info:{view.address}"] = asyncio.get_running_loop().create_task(
                    self._refresh_one(view))  # a new plan: fetch it now, not at the recheck
            view.info.shard.CopyFrom(snap.shard)
        for h in snap.deltas:
            hist = Histogram.from_pairs(zip(h.buckets, h.counts), h.sum_s, h.max_s)
            key = h.name if not h.name.startswith("hop:") else f"{h.name}>{view.node_id}"
            self._windows.setdefault(key, deque()).append((now, hist))
        self._record_throughput(now)
        self._changed()

    def _record_throughput(self, now: float) -> None:
        total = sum(v.tokens_per_s for v in self.nodes.values() if v.state == "up")
        if not self.throughput or now - self.throughput[-1][0] >= 0.5:
            self.throughput.append((now, total))

    async def _suspects(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            changed = False
            for view in self.nodes.values():
                if view.state == "up" and view.heartbeat_age > SUSPECT_AFTER_S:
                    view.state = "suspect"
                    self.log("suspect", f"{view.label}: no metrics for "
                                        f"{view.heartbeat_age:.1f} s")
                    changed = True
            if changed:
                self._changed()

    def _note_recoveries(self, view: NodeView, info: pb.NodeInfo) -> None:
        """Log each recovery a node reports, once (every survivor may report the same),
        and remember who coordinates each plan epoch the node reports."""
        seen = self._recoveries_seen.get(view.address, None)
        self._recoveries_seen[view.address] = len(info.recoveries)
        if seen is not None:  # recoveries from before we started watching are history
            self._log_recoveries(info, info.recoveries[seen:])
        if info.coordinator and info.HasField("plan"):
            self._coordinators[info.plan.epoch] = info.coordinator

    def _log_recoveries(self, info: pb.NodeInfo, recoveries) -> None:
        labels = {v.node_id: v.label for v in self.nodes.values()}
        for r in recoveries:
            key = (r.to_epoch, tuple(sorted(r.lost)))
            if key in self._recoveries_logged:
                continue
            self._recoveries_logged.add(key)
            plans = [info.plan] + [v.info.plan for v in self.nodes.values() if v.info]
            plan = next((p for p in plans if p.epoch == r.to_epoch and p.shards), None)
            self.log(*recovery_event(r, labels, plan,
                                     self._coordinators.get(r.from_epoch, "")))

    # ------------------------------------------------------------ derived state

    def window(self, series: str) -> Histogram:
        """The series' histogram over the sliding window, merged across nodes."""
        cutoff = time.monotonic() - self.window_s
        parts = self._windows.get(series)
        if not parts:
            return Histogram()
        while parts and parts[0][0] < cutoff:
            parts.popleft()
        return Histogram.merged(h for _, h in parts)

    def hop_series(self) -> list[tuple[str, str, Histogram]]:
        """(sender label, receiver label, histogram) per node pair with hop data."""
        labels = {v.node_id: v.label for v in self.nodes.values()}
        out = []
        for key in sorted(self._windows):
            if key.startswith("hop:"):
                sender, receiver = key[4:].split(">", 1)
                out.append((labels.get(sender, sender[:8]), labels.get(receiver, receiver[:8]),
                            self.window(key)))
        return out

    def coordinator(self) -> str:
        """The node id coordinating the newest plan, as the nodes holding it report it (''
        when none does: nothing loaded, or nodes that do not report one)."""
        plan = self.plan()
        said = Counter(v.info.coordinator for v in self.nodes.values()
                       if plan is not None and v.info is not None and v.state != "down"
                       and v.info.plan.epoch == plan.epoch and v.info.coordinator)
        return min(said, key=lambda n: (-said[n], n)) if said else ""

    def plan(self) -> pb.Plan | None:
        """The newest plan any up node holds."""
        plans = [v.info.plan for v in self.nodes.values()
                 if v.info is not None and v.info.HasField("plan") and v.state != "down"]
        return max(plans, key=lambda p: p.epoch) if plans else None

    def up_clients(self) -> list[NodeClient]:
        """Clients of the live nodes, in name order (the order plans are made in)."""
        live = sorted((v.label, a) for a, v in self.nodes.items()
                      if v.state in ("up", "suspect"))
        return [self._client(a) for _, a in live]

    def _idle(self, task_name: str) -> bool:
        task = self._tasks.get(task_name)
        return task is None or task.done()

    async def _refresh_one(self, view: NodeView) -> None:
        with contextlib.suppress(ClusterError):
            view.info = await self._client(view.address).info()
            self._note_recoveries(view, view.info)
            self._changed()

    async def refresh_infos(self) -> None:
        for address, view in self.nodes.items():
            if view.state == "down":
                continue
            with contextlib.suppress(ClusterError):
                view.info = await self._client(address).info()
                self._note_recoveries(view, view.info)
        self._changed()
