"""`make screenshots`: capture the dashboard from a real local cluster.

Starts a 3-node loopback cluster, each node pinned to its own core where the machine has
three (else sharing them, round-robin), opens the dashboard headless, loads the bundled
model through the load modal (saving the plan preview), runs generations (the main view
is taken while 12 stream at once, so the busy and micro-batch columns show load), and
saves SVGs (and
PNGs when cairosvg is available) into screenshots/: the main view during generation, the
plan preview modal, the node detail screen, the model as a tensor-parallel mlx-ring group,
and the recovery after a node is killed from the dashboard mid-generation. Look at them
before committing.

    .venv/bin/python -m console.tui.screenshots [--out screenshots]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

from console import local
from console.monitor import ClusterMonitor
from console.ops import generate
from console.tui.app import ClusterApp
from node.plan import DEFAULT_STRATEGY
from protos import cluster_pb2 as pb

SIZE = (150, 46)
LOAD = 12  # requests streaming at once in the main view
PROMPTS = ("What is the capital of France?", "What is the boiling point of water in Celsius?",
           "Name three primary colors.")


async def capture(addresses: list[str], out: Path) -> list[Path]:
    monitor = ClusterMonitor(addresses, mdns=False, hz=4)
    app = ClusterApp(monitor)
    saved: list[Path] = []

    def shot(name: str) -> None:
        saved.append(Path(app.save_screenshot(filename=f"{name}.svg", path=str(out))))

    async with app.run_test(size=SIZE) as pilot:
        async def until(predicate, timeout: float) -> None:
            t0 = time.monotonic()
            while not predicate() and time.monotonic() - t0 < timeout:
                await pilot.pause(0.1)

        await until(lambda: sum(v.state == "up" for v in monitor.nodes.values()) == 3, 30)
        await pilot.press("l")
        await pilot.click("#preview-button")
        await until(lambda: not app.screen.query_one("#load-button").disabled, 120)
        await pilot.pause(0.3)
        shot("plan-preview")
        await pilot.click("#load-button")
        await until(lambda: monitor.plan() is not None, 180)
        await pilot.pause(1.0)
        for prompt in PROMPTS:  # fill the latency histograms
            await pilot.press("g")
            app.screen.query_one("#prompt").value = prompt
            await pilot.click("#go")
            await until(lambda: "tok/s" in str(app.screen.query_one("#stats").render()), 60)
            await pilot.press("escape")
        # the main view while a long generation streams (a modal's own worker would be
        # cancelled with the modal, so this one runs beside the app)
        request = pb.GenerateRequest(prompt="Tell me about the history of Paris.", chat=True,
                                     max_tokens=120, ignore_eos=True)
        load = [pb.GenerateRequest(prompt=f"{PROMPTS[i % 3]} ({i})", chat=True, max_tokens=120,
                                   ignore_eos=True) for i in range(LOAD)]
        streaming = asyncio.gather(*(generate(monitor.up_clients(), r) for r in load))
        await until(lambda: bool(monitor.throughput) and monitor.throughput[-1][1] > 0, 60)
        await pilot.pause(3.0)
        shot("dashboard")
        await streaming
        await pilot.press("d")
        await pilot.pause(0.5)
        shot("node-detail")
        await pilot.press("escape")
        # the same model as MLX's own tensor-parallel ring group, loaded through the modal
        await pilot.press("l")
        app.screen.query_one("#backend").value = "mlx-ring:tensor"
        await pilot.click("#preview-button")
        await until(lambda: not app.screen.query_one("#load-button").disabled, 120)
        await pilot.click("#load-button")
        await until(lambda: (monitor.plan() is not None and monitor.plan().backend == "mlx-ring"
                             and all(v.info is not None and v.info.shard.ring.state == "ready"
                                     for v in monitor.nodes.values())), 180)
        short = pb.GenerateRequest(prompt=PROMPTS[0], chat=True, max_tokens=8)
        await generate(monitor.up_clients(), short)
        await pilot.pause(1.5)
        shot("tensor-parallel")
        app.load_model("smollm2-135m", DEFAULT_STRATEGY, "pipeline")  # back to the pipeline
        await until(lambda: monitor.plan() is not None and monitor.plan().backend != "mlx-ring",
                    180)
        await pilot.pause(1.0)
        # kill the last node from the dashboard while a request streams: the recovery
        streaming = asyncio.ensure_future(generate(monitor.up_clients(), request))
        await pilot.pause(1.5)
        table = app.query_one("#nodes")
        table.move_cursor(row=table.row_count - 1)
        await pilot.press("f")
        app.screen.query_one("#kind").value = "kill"
        await pilot.click("#inject")
        await until(lambda: any(e.kind == "recovery" for e in monitor.events), 30)
        await pilot.pause(2.0)
        shot("recovery")
        await streaming
    return saved


def to_png(svgs: list[Path]) -> list[Path]:
    try:
        import cairosvg
    except ImportError:  # cairosvg needs the system cairo library
        print("cairosvg not available: SVGs only", file=sys.stderr)
        return []
    pngs = []
    for svg in svgs:
        png = svg.with_suffix(".png")
        cairosvg.svg2png(url=str(svg), write_to=str(png), output_width=1500)
        pngs.append(png)
    return pngs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("screenshots"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cluster.json"
        cluster = local.up(3, path=path, node_args=["--no-advertise", "--allow-faults"],
                           cpus_per_node=1, oversubscribe=True)
        try:
            svgs = asyncio.run(capture([n["address"] for n in cluster["nodes"]], args.out))
        finally:
            local.down(path)
    for f in [*svgs, *to_png(svgs)]:
        print(f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
