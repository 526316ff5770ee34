"""Benchmark: the dashboard's own CPU use while 16 real nodes stream metrics at 10 Hz.

Starts 16 node processes on loopback (no model loaded: the metrics stream still flows),
runs the dashboard headless in this process attached to all of them at 10 Hz, and prints
this process's CPU % (of one core) over the measurement window. Target: <= 15 %.

    .venv/bin/python tests/bench/tui_load.py [--nodes 16] [--hz 10] [--seconds 30]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from console import local  # noqa: E402
from console.monitor import ClusterMonitor  # noqa: E402
from console.tui.app import ClusterApp  # noqa: E402


async def measure(addresses: list[str], hz: float, seconds: float) -> tuple[float, int, int]:
    monitor = ClusterMonitor(addresses, mdns=False, hz=hz)
    app = ClusterApp(monitor)
    snapshots = 0

    def count() -> None:
        nonlocal snapshots
        snapshots += 1

    monitor.on_change(count)
    async with app.run_test(size=(160, 50)) as pilot:
        t0 = time.monotonic()
        while sum(v.state == "up" for v in monitor.nodes.values()) < len(addresses):
            if time.monotonic() - t0 > 60:
                raise SystemExit("not every node came up")
            await pilot.pause(0.2)
        await pilot.pause(2.0)  # settle
        me = psutil.Process()
        cpu0, wall0, snaps0 = me.cpu_times(), time.monotonic(), snapshots
        await pilot.pause(seconds)
        cpu1, wall1 = me.cpu_times(), time.monotonic()
        used = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
        up = sum(v.state == "up" for v in monitor.nodes.values())
        return 100 * used / (wall1 - wall0), snapshots - snaps0, up


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=16)
    parser.add_argument("--hz", type=float, default=10.0)
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cluster.json"
        print(f"starting {args.nodes} nodes ...", flush=True)
        cluster = local.up(args.nodes, path=path, timeout_s=180, node_args=["--no-advertise"])
        try:
            addresses = [n["address"] for n in cluster["nodes"]]
            cpu, updates, up = asyncio.run(measure(addresses, args.hz, args.seconds))
        finally:
            local.down(path)
    expected = args.nodes * args.hz * args.seconds
    print(f"nodes up {up}/{args.nodes}, metric snapshots received {updates} "
          f"(expected ~{expected:.0f}) in {args.seconds:.0f} s")
    print(f"dashboard process CPU: {cpu:.1f} % of one core (target <= 15 %)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
