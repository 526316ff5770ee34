"""A seeded, frozen stand-in for ClusterMonitor, for widget and snapshot tests only.

It implements console.monitor.MonitorSource, the protocol the dashboard uses
(tests/tui/test_monitor_source.py checks both conform).
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable

from console.client import NodeClient
from console.monitor import Event, NodeView, recovery_event
from node import PROTOCOL_VERSION
from node.histogram import Histogram
from node.plan import GIB
from protos import cluster_pb2 as pb

T0 = 1_764_000_000.0  # a fixed wall-clock time for event stamps


class FrozenNode(NodeView):
    @property
    def heartbeat_age(self) -> float:
        return 0.3


class FakeMonitor:
    """A MonitorSource with fixed data: no network, no clock. `takeover`: local-0, the
    coordinator, has died and the survivors run epoch 3 under local-1."""

    def __init__(self, n: int = 3, loaded: bool = True, tensor: bool = False,
                 takeover: bool = False, guarded: bool = False) -> None:
        rng = random.Random(42)
        self.mdns, self.static = False, [f"127.0.0.1:5005{i}" for i in range(n)]
        # guarded: local-1 needs a token this console lacks, local-2 is open (--insecure)
        self.has_token = not guarded
        self.nodes: dict[str, NodeView] = {}
        self._plan = None
        ranges = [(0, 29)] * n if tensor else [(0, 9), (10, 19), (20, 29)][:n]
        if takeover:
            ranges = [(0, 0), (0, 14), (15, 29)]  # local-0's is not used: it is down
        epoch = 3 if takeover else 2
        if loaded:
            self._plan = pb.Plan(model="smollm2-135m", epoch=epoch, n_layers=30,
                                 strategy="memory", context_length=8192)
            if tensor:  # an mlx-ring group: every rank holds 1/n of every layer
                self._plan.backend, self._plan.parallel = "mlx-ring", "tensor"
                self._plan.strategy = "tensor"
        for i, address in enumerate(self.static):
            info = pb.NodeInfo(node_id=f"node{i:08x}", name=f"local-{i}", address=address,
                               protocol_version=PROTOCOL_VERSION)
            dead = takeover and i == 0
            info.auth_required = guarded and i == 1
            info.insecure = guarded and i == 2
            info.capabilities.memory_budget = 20 * GIB
            info.capabilities.mlx_device, info.capabilities.blas = "cpu", "openblas"
            snap = pb.MetricsSnapshot(node_id=info.node_id, cpu_percent=[38.5, 22.0, 41.2][i % 3],
                                      mlx_active_bytes=[260, 142, 260][i % 3] * 2**20,
                                      memory_budget=20 * GIB, interval_s=0.25, state="serving",
                                      busy_fraction=[0.62, 0.35, 0.58][i % 3],
                                      microbatches=2)
            if loaded and not dead:
                start, end = ranges[i]
                info.coordinator = "node00000001" if takeover else "node00000000"
                info.shard.CopyFrom(pb.ShardInfo(model="smollm2-135m", start_layer=start,
                                                 end_layer=end, n_layers=30, epoch=epoch))
                if tensor:
                    info.shard.ring.CopyFrom(pb.RingWorker(parallel="tensor", rank=i, size=n,
                                                           state="ready"))
                else:  # the pipeline's prefix caches: the entry node looks for every request
                    info.shard.prompt_cache.CopyFrom(pb.PromptCache(
                        bytes=[12, 8, 4][i % 3] * 2**20, max_bytes=GIB, entries=3,
                        lookups=[40, 30, 30][i % 3], hits=30, tokens_reused=9000))
                snap.shard.CopyFrom(info.shard)
                self._plan.shards.append(pb.PlanShard(
                    node_id=info.node_id, address=address, name=info.name, start_layer=start,
                    end_layer=end, param_bytes=[260, 142, 260][i % 3] * 2**20,
                    kv_bytes=120 * 2**20))
            view = FrozenNode(address, info.node_id, info.name, "down" if dead else "up", info,
                              None if dead else snap, 1.0,
                              [15.2, 0.0, 0.0][i % 3] if loaded else 0.0,
                              [3.4, 3.1, 2.9][i % 3] if loaded else 0.0)
            snap.active_requests = 4 if loaded else 0
            self.nodes[address] = view
        if loaded:
            for view in self.nodes.values():
                if view.info.HasField("shard"):
                    view.info.plan.CopyFrom(self._plan)
        self.hists = {name: Histogram() for name in ("token_latency", "ttft", "step_compute",
                                                     "token_transfer")}
        if loaded:
            for _ in range(400):
                self.hists["token_latency"].record(rng.lognormvariate(-2.8, 0.15))
                self.hists["step_compute"].record(rng.lognormvariate(-3.9, 0.2))
                self.hists["token_transfer"].record(rng.lognormvariate(-5.7, 0.2))
            for _ in range(12):
                self.hists["ttft"].record(rng.lognormvariate(-1.6, 0.1))
        self.hops = []
        if loaded:
            names = [v.label for v in self.nodes.values() if v.state == "up"]
            for a, b in zip(names, names[1:] + names[:1]):
                h = Histogram()
                for _ in range(300):
                    h.record(rng.lognormvariate(-7.4, 0.3))
                self.hops.append((a, b, h))
        self.throughput = deque((T0 + i, 14 + 2 * rng.random()) for i in range(60)) \
            if loaded else deque()
        self.tokens_total = 812 if loaded else 0
        texts = [("up", "local-0 (127.0.0.1:50050) is up via static"),
                 ("up", "local-1 (127.0.0.1:50051) is up via static"),
                 ("up", "local-2 (127.0.0.1:50052) is up via static"),
                 ("load", "smollm2-135m loaded as epoch 2 on 3 nodes"),
                 ("info", "generated 48 tokens · length · TTFT 212 ms · 15.1 tok/s")]
        if takeover:
            labels = {v.node_id: v.label for v in self.nodes.values()}
            texts += [("down", "local-0 (127.0.0.1:50050) is down: UNAVAILABLE"),
                      recovery_event(pb.Recovery(
                          from_epoch=2, to_epoch=3, lost=["node00000000"], detect_s=0.61,
                          replan_s=0.01, reload_s=0.34, first_token_s=0.12,
                          resumed_requests=2, coordinator="node00000001",
                          noticed_by="node00000002"), labels, self._plan,
                          previous="node00000000")]
        self.events = deque(Event(T0 + i, k, t) for i, (k, t) in enumerate(texts))
        self.event_count = len(self.events)

    def on_change(self, callback: Callable[[], None]) -> None:
        pass

    def log(self, kind: str, text: str) -> None:
        self.events.append(Event(T0 + len(self.events), kind, text))
        self.event_count += 1

    def plan(self) -> pb.Plan | None:
        return self._plan

    def coordinator(self) -> str:
        return next((v.info.coordinator for v in self.nodes.values()
                     if v.state == "up" and v.info.coordinator), "")

    def window(self, series: str) -> Histogram:
        return self.hists.get(series, Histogram())

    def hop_series(self) -> list[tuple[str, str, Histogram]]:
        return self.hops

    def up_clients(self) -> list[NodeClient]:
        return []

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def switch_source(self, addresses: list[str] | None, mdns: bool) -> None:
        """Only remembers the source: the fake's nodes stay as they are."""
        self.static, self.mdns = list(addresses or []), mdns
        self.log("info", "discovery source: " + ("zeroconf" if mdns else "static ")
                 + ", ".join(self.static))

    async def refresh_infos(self) -> None:
        pass
