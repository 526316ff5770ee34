"""Counters and latency windows a node keeps about its own work.

Latencies are kept as bounded windows of raw samples (the last N per series), which
is exact for percentiles over that window and small enough to summarise on request.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field

import numpy as np

WINDOW = 4096


@dataclass
class NodeMetrics:
    counters: Counter = field(default_factory=Counter)
    series: dict[str, deque] = field(default_factory=dict)

    def inc(self, name: str, by: int = 1) -> None:
        self.counters[name] += by

    def observe(self, name: str, seconds: float) -> None:
        window = self.series.get(name)
        if window is None:
            window = self.series[name] = deque(maxlen=WINDOW)
        window.append(seconds)

    def summaries(self) -> list[dict]:
        """One dict per series: name, count, p50/p90/p99/mean/max in seconds."""
        out = []
        for name, window in sorted(self.series.items()):
            if not window:
                continue
            a = np.fromiter(window, dtype=float)
            p50, p90, p99 = np.percentile(a, [50, 90, 99])
            out.append({"name": name, "count": len(a), "p50_s": p50, "p90_s": p90,
                        "p99_s": p99, "mean_s": float(a.mean()), "max_s": float(a.max())})
        return out
