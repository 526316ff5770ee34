"""Counters and latency histograms a node keeps about its own work.

Latencies go into log-bucket histograms (node/histogram.py): exact to merge across nodes
and time windows, constant memory. `GetMetrics` summarises the totals; each
`WatchMetrics` stream sends the buckets recorded since its previous snapshot.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from node.histogram import Histogram
from protos import cluster_pb2 as pb


@dataclass
class NodeMetrics:
    counters: Counter = field(default_factory=Counter)
    histograms: dict[str, Histogram] = field(default_factory=dict)

    def inc(self, name: str, by: int = 1) -> None:
        self.counters[name] += by

    def observe(self, name: str, seconds: float) -> None:
        h = self.histograms.get(name)
        if h is None:
            h = self.histograms[name] = Histogram()
        h.record(seconds)

    def summaries(self) -> list[dict]:
        """One dict per series: name, count, p50/p90/p99/mean/max in seconds."""
        return [{"name": name, "count": h.total, "p50_s": h.percentile(50),
                 "p90_s": h.percentile(90), "p99_s": h.percentile(99), "mean_s": h.mean,
                 "max_s": h.max_s}
                for name, h in sorted(self.histograms.items()) if h.total]

    def copy_totals(self) -> dict[str, tuple[dict[int, int], int, float]]:
        """A cheap copy of every histogram's state, for computing deltas later."""
        return {n: (dict(h.counts), h.total, h.sum_s) for n, h in self.histograms.items()}

    def deltas_since(self, before: dict[str, tuple[dict[int, int], int, float]]
                     ) -> dict[str, Histogram]:
        """What each histogram recorded since `before` (a copy_totals() result)."""
        out = {}
        for name, h in self.histograms.items():
            counts, total, sum_s = before.get(name, ({}, 0, 0.0))
            if h.total == total:
                continue
            delta = Histogram.from_pairs(
                ((i, c - counts.get(i, 0)) for i, c in h.counts.items()),
                sum_s=h.sum_s - sum_s, max_s=h.max_s)
            out[name] = delta
        return out

    def message(self, node_id: str, active_requests: int, cpu_percent: float,
                rss_bytes: int) -> pb.Metrics:
        """The totals as GetMetrics answers them."""
        c = self.counters
        return pb.Metrics(
            node_id=node_id, requests_started=c["requests_started"],
            requests_completed=c["requests_completed"], requests_failed=c["requests_failed"],
            tokens_generated=c["tokens_generated"], frames_in=c["frames_in"],
            frames_out=c["frames_out"], bytes_in=c["bytes_in"], bytes_out=c["bytes_out"],
            frames_rejected=c["frames_rejected"],
            latencies=[pb.LatencySummary(**s) for s in self.summaries()],
            active_requests=active_requests, cpu_percent=cpu_percent, rss_bytes=rss_bytes,
            requests_retried=c["requests_retried"], recoveries=c["recoveries"],
            counters=dict(c))


def histogram_messages(histograms: dict[str, Histogram]) -> list[pb.Histogram]:
    """Histograms (e.g. deltas_since's) as WatchMetrics sends them: their buckets."""
    return [pb.Histogram(name=n, buckets=[i for i, _ in h.pairs()],
                         counts=[c for _, c in h.pairs()], sum_s=h.sum_s, max_s=h.max_s)
            for n, h in histograms.items()]
