"""`mlx-cluster bench --local --scenario chaos --duration 20m`: a soak that keeps streaming
chat load through the OpenAI-compatible API while it injects faults, one at a time, and
checks invariants the whole time (as Chaos Mesh and Jepsen-style suites do).

The faults take turns, each on a random node of the plan, with a gap after each for the
recovery: a kill (SIGKILL, then the node is restarted with its own command line, on a new
port, and rejoins by itself), latency (50 ms +- 10 for 20 s), frame loss (5 % for 20 s)
and a partition from the entry node (both ways, 10 s; the node, left behind, rejoins).
Meanwhile `concurrency` clients stream greedy chat completions, one after another.

Checked throughout:
- every request completes, and every answer equals its fault-free answer;
- one plan per epoch: every node that reports an epoch reports the same plan for it (no
  two plans ever serve under one epoch; each request is on one plan at a time).
Recorded: each node's RSS and MLX active memory every 10 s, the KV bytes each node holds
(MLX memory less weights and the prefix cache) before the load and once it stops, the
longest stall of any stream, every epoch and the faults with their recovery times.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import psutil

from console import ops
from console.client import ClusterError, NodeClient
from protos import cluster_pb2 as pb

QUESTIONS = ["What is the capital of France?", "Name three planets.",
             "What is water made of?", "Who wrote Hamlet?", "What is two plus two?",
             "Name a primary colour.", "What do bees make?", "How many legs has a spider?"]
FAULTS = ("kill", "latency", "loss", "partition")
SAMPLE_S = 10.0  # memory samples
WARM_S = 120.0  # RSS growth is measured after this (allocators settle first)
PLAN_SETTLE_S = 30.0  # ... and this long after a plan switch (caches fill again first)
RECOVERY_WAIT_S = 60.0  # at most this long for a node to be back in the plan
GAP_S = 10.0  # quiet time after each fault's recovery


@dataclass
class Node:
    node_id: str
    name: str
    address: str
    pid: int
    cmdline: list[str]
    ready: Path
    log: Path


@dataclass
class Soak:
    nodes: dict[str, Node]  # by node id
    url: str = ""
    results: list[dict] = field(default_factory=list)
    plans: dict[int, tuple] = field(default_factory=dict)  # epoch -> shards seen
    split_brain: list[str] = field(default_factory=list)
    memory: list[dict] = field(default_factory=list)
    faults: list[dict] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def addresses(self) -> list[str]:
        return [n.address for n in self.nodes.values()]


async def chat(session: aiohttp.ClientSession, url: str, question: str, tokens: int) -> dict:
    """One streamed greedy chat completion: its text, the longest gap between pieces, and
    the error if it failed."""
    body = {"model": "", "messages": [{"role": "user", "content": question}],
            "max_tokens": tokens, "temperature": 0, "stream": True, "ignore_eos": True}
    pieces, gaps, last, t0 = [], [], None, time.monotonic()
    try:
        async with session.post(f"{url}/v1/chat/completions", json=body) as reply:
            if reply.status != 200:
                return {"ok": False, "error": f"HTTP {reply.status}: {await reply.text()}"}
            async for line in reply.content:
                text = line.decode().strip()
                if not text.startswith("data: ") or text == "data: [DONE]":
                    continue
                chunk = json.loads(text[6:])
                if "error" in chunk:
                    return {"ok": False, "error": str(chunk["error"])}
                for choice in chunk.get("choices", []):
                    if choice.get("delta", {}).get("content"):
                        now = time.monotonic()
                        gaps.append(now - (last if last is not None else t0))
                        last = now
                        pieces.append(choice["delta"]["content"])
    except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError) as e:
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}
    return {"ok": True, "text": "".join(pieces), "max_gap_s": max(gaps[1:], default=0.0)}


async def infos(soak: Soak) -> dict[str, pb.NodeInfo]:
    """The info of every node that answers, by node id."""
    async with ops.connect(soak.addresses()) as clients:
        found = await asyncio.gather(*(c.info() for c in clients), return_exceptions=True)
    return {i.node_id: i for i in found if isinstance(i, pb.NodeInfo)}


def kv_bytes(info: pb.NodeInfo) -> int:
    """KV the node holds for requests: MLX memory less its weights and its prefix cache."""
    return max(0, info.mlx_active_bytes - info.shard.weight_bytes
               - info.shard.prompt_cache.bytes)


async def watch(soak: Soak, stop: asyncio.Event) -> None:
    """One plan per epoch (every second) and memory (every SAMPLE_S)."""
    next_memory = 0.0
    while not stop.is_set():
        now = time.monotonic() - soak.started
        for node_id, info in (await infos(soak)).items():
            if info.HasField("shard"):
                shape = tuple((s.node_id, s.start_layer, s.end_layer) for s in info.plan.shards)
                seen = soak.plans.setdefault(info.plan.epoch, shape)
                if seen != shape:
                    soak.split_brain.append(f"epoch {info.plan.epoch}: {seen} and {shape}")
            if now >= next_memory:
                soak.memory.append({"t_s": round(now, 1), "node": node_id, "pid": info.pid,
                                    "rss_bytes": info.rss_bytes,
                                    "mlx_active_bytes": info.mlx_active_bytes,
                                    "kv_bytes": kv_bytes(info), "epoch": info.shard.epoch,
                                    "layers": [info.shard.start_layer, info.shard.end_layer]
                                    if info.HasField("shard") else None,
                                    "mlx_cache_bytes": info.mlx_cache_bytes,
                                    "loading": bool(info.loading_epoch),
                                    # a replaced plan finishing its requests, or a plan
                                    # loaded beside: two plans' weights, for a while
                                    "extra_plans": len(info.draining_epochs)
                                    + bool(info.staged_epoch)})
        if now >= next_memory:
            next_memory = now + SAMPLE_S
        await asyncio.sleep(1.0)


async def load(soak: Soak, stop: asyncio.Event, reference: dict[str, str], tokens: int,
               worker: int, concurrency: int) -> None:
    i = worker
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        while not stop.is_set():
            question = QUESTIONS[i % len(QUESTIONS)]
            i += concurrency
            t0 = time.monotonic() - soak.started
            r = await chat(session, soak.url, question, tokens)
            r["t_s"], r["start_s"], r["question"] = time.monotonic() - soak.started, t0, question
            r["identical"] = r["ok"] and r["text"] == reference[question]
            soak.results.append(r)


async def entry_and_plan(soak: Soak) -> pb.NodeInfo | None:
    found = await infos(soak)
    try:
        return ops.entry_node(list(found.values()))
    except ClusterError:
        return None


async def back_in_plan(soak: Soak, node_id: str) -> float | None:
    """Seconds until `node_id` is a member of the serving plan again (None: not within
    RECOVERY_WAIT_S)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < RECOVERY_WAIT_S:
        entry = await entry_and_plan(soak)
        if entry is not None and node_id in {s.node_id for s in entry.plan.shards}:
            return time.monotonic() - t0
        await asyncio.sleep(0.5)
    return None


async def restart(soak: Soak, node: Node, cluster_path: Path) -> None:
    """Start the node again with its own command line (a new port: it asks to rejoin)."""
    before = node.ready.read_text() if node.ready.exists() else ""
    with open(node.log, "ab") as out:
        proc = subprocess.Popen(node.cmdline, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 60:
        text = node.ready.read_text() if node.ready.exists() else ""
        if text and text != before:
            try:
                node.address = json.loads(text)["address"]
                break
            except (ValueError, KeyError):
                pass
        await asyncio.sleep(0.1)
    node.pid = proc.pid
    cluster = json.loads(cluster_path.read_text())  # so that `local down` stops it
    for entry in cluster["nodes"]:
        if entry["node_id"] == node.node_id:
            entry.update(pid=node.pid, address=node.address)
    cluster_path.write_text(json.dumps(cluster, indent=2))


async def fault(soak: Soak, kind: str, rng: random.Random, cluster_path: Path) -> dict:
    """Inject one fault into a random member of the plan and wait for its recovery."""
    entry = await entry_and_plan(soak)
    if entry is None:
        return {"kind": kind, "node": "", "epoch_before": None, "epoch_after": None,
                "error": "no entry node to read the plan from"}
    members = [s.node_id for s in entry.plan.shards]
    victim = soak.nodes[rng.choice(members if kind != "partition"
                                   else [m for m in members if m != entry.node_id] or members)]
    record = {"kind": kind, "node": victim.name, "at_s": round(time.monotonic() - soak.started,
                                                                  1),
              "epoch_before": entry.plan.epoch}
    client = NodeClient(victim.address, 5.0)
    try:
        if kind == "kill":
            os.kill(victim.pid, signal.SIGKILL)
            await asyncio.sleep(3.0)
            await restart(soak, victim, cluster_path)
            record["rejoin_s"] = await back_in_plan(soak, victim.node_id)
        elif kind == "partition":
            spec = pb.FaultSpec(kind="partition", direction="both", duration_s=10,
                                peers=[entry.node_id, soak.nodes[entry.node_id].address])
            await client.inject(spec)
            await asyncio.sleep(10.5)
            await client.heal()
            record["rejoin_s"] = await back_in_plan(soak, victim.node_id)
        else:
            spec = (pb.FaultSpec(kind="latency", ms=50, jitter_ms=10, duration_s=20,
                                 seed=rng.randrange(1 << 30)) if kind == "latency" else
                    pb.FaultSpec(kind="loss", p=0.05, duration_s=20,
                                 seed=rng.randrange(1 << 30)))
            await client.inject(spec)
            await asyncio.sleep(20.5)
            await client.heal()
    except ClusterError as e:
        record["error"] = str(e)
    finally:
        await client.close()
    after = await entry_and_plan(soak)
    record["epoch_after"] = after.plan.epoch if after is not None else None
    return record


def rss_growth(memory: list[dict]) -> dict[str, float]:
    """Per node process: RSS at its last steady sample over its first one. Steady: the
    process has run WARM_S (a restarted node's process counts from its own first sample),
    its plan has served there for PLAN_SETTLE_S, it holds that plan only, and the layers
    it holds at its last sample.

    Why each condition: a re-plan moves layers between nodes, and a shard of 15 layers is
    rightly bigger than one of 10; while a replaced plan finishes its requests, or a new
    one is staged beside, the node rightly holds both; and a node that drops a plan gives
    its memory back (node/memory.py), MLX's buffer cache included, which then fills again
    with the new plan's traffic (about 30 MiB of cache and the KV of the streams, seconds
    after the switch). What is compared is the same shard alone and in use, so that growth
    means memory kept, not memory a plan gave it or a switch had just returned."""
    growth: dict[str, float] = {}
    for key in {(m["node"], m["pid"]) for m in memory}:
        mine = [m for m in memory if (m["node"], m["pid"]) == key]
        born = mine[0]["t_s"]
        since: dict[int, float] = {}  # when each epoch was first seen serving here
        for m in mine:
            since.setdefault(m["epoch"], m["t_s"])
        alone = [m for m in mine if not m.get("loading") and not m.get("extra_plans")
                 and m.get("layers") is not None]
        if not alone:
            continue
        layers = alone[-1]["layers"]
        samples = [m for m in alone if m["layers"] == layers
                   and m["t_s"] >= max(WARM_S, born + WARM_S)
                   and m["t_s"] >= since[m["epoch"]] + PLAN_SETTLE_S]
        if len(samples) >= 2 and samples[0]["rss_bytes"]:
            growth[f"{key[0][:8]} pid {key[1]}"] = (samples[-1]["rss_bytes"]
                                                    / samples[0]["rss_bytes"] - 1)
    return growth


async def run_chaos(cluster: dict, cluster_path: Path, model: str, duration_s: float,
                    concurrency: int, tokens: int, seed: int, progress=None) -> dict:
    """The soak on a local cluster started with --allow-faults; the result document's
    `chaos` section."""
    from node.api import Gateway, Nodes, start
    from node.peers import PeerChannels

    progress = progress or (lambda message: None)
    nodes = {}
    for n in cluster["nodes"]:
        nodes[n["node_id"]] = Node(n["node_id"], n["name"], n["address"], n["pid"],
                                   psutil.Process(n["pid"]).cmdline(),
                                   Path(n["log"]).with_suffix(".ready.json"), Path(n["log"]))
    soak = Soak(nodes)
    async with ops.connect(soak.addresses()) as clients:
        plan, _ = await ops.load_plan(clients, model, "", 0, "memory", progress=progress)
    channels = PeerChannels()
    runner, port = await start(Gateway(Nodes(soak.addresses, channels)), "127.0.0.1", 0)
    soak.url = f"http://127.0.0.1:{port}"
    rng = random.Random(seed)
    try:
        async with aiohttp.ClientSession() as session:
            reference = {}
            for q in QUESTIONS:
                r = await chat(session, soak.url, q, tokens)
                if not r["ok"]:
                    raise ClusterError(f"the fault-free reference failed: {r['error']}")
                reference[q] = r["text"]
        baseline_kv = {k: kv_bytes(i) for k, i in (await infos(soak)).items()}
        soak.started = time.monotonic()
        stop_load, stop_watch = asyncio.Event(), asyncio.Event()
        tasks = [asyncio.create_task(load(soak, stop_load, reference, tokens, w, concurrency))
                 for w in range(concurrency)]
        watcher = asyncio.create_task(watch(soak, stop_watch))
        order = list(FAULTS)
        while time.monotonic() - soak.started < duration_s - 60:
            if not order:
                order = list(FAULTS)
            rng.shuffle(order)
            record = await fault(soak, order.pop(), rng, cluster_path)
            soak.faults.append(record)
            ok = sum(r["ok"] and r["identical"] for r in soak.results)
            progress(f"[{time.monotonic() - soak.started:6.0f} s] {record['kind']} on "
                     f"{record['node']}: epoch {record['epoch_before']} -> "
                     f"{record['epoch_after']}; {ok}/{len(soak.results)} requests exact")
            await asyncio.sleep(GAP_S)
        while time.monotonic() - soak.started < duration_s:
            await asyncio.sleep(1.0)
        stop_load.set()
        await asyncio.gather(*tasks)
        await asyncio.sleep(2.0)  # the last releases travel the ring
        end_kv = {k: kv_bytes(i) for k, i in (await infos(soak)).items()}
        stop_watch.set()
        await watcher
    finally:
        await runner.cleanup()
        await channels.close()
    results = soak.results
    return {
        "model": model, "duration_s": duration_s, "concurrency": concurrency,
        "tokens": tokens, "seed": seed, "nodes": len(nodes),
        "requests": len(results), "succeeded": sum(r["ok"] for r in results),
        "identical": sum(r["identical"] for r in results),
        "errors": [r["error"] for r in results if not r["ok"]][:10],
        "longest_stall_s": max((r["max_gap_s"] for r in results if r["ok"]), default=0.0),
        "longest_stalls": [{k: r[k] for k in ("start_s", "t_s", "max_gap_s", "question")}
                           for r in sorted((r for r in results if r["ok"]),
                                           key=lambda r: -r["max_gap_s"])[:5]],
        "one_plan_per_epoch": not soak.split_brain, "split_brain": soak.split_brain[:10],
        "epochs": [{"epoch": e, "shards": [list(s) for s in shape]}
                   for e, shape in sorted(soak.plans.items())],
        "first_epoch": plan.epoch, "faults": soak.faults, "memory": soak.memory,
        "rss_growth_after_warmup": rss_growth(soak.memory),
        "kv_bytes_baseline": baseline_kv, "kv_bytes_after": end_kv,
    }


def run_local_chaos(work, nodes: int, duration_s: float, local: bool, progress=None) -> dict:
    """The chaos soak on a local cluster of `nodes` nodes it starts (with faults allowed)
    and stops: a result document (schema mlx-cluster-bench/1) with a `chaos` section."""
    import tempfile

    from console import local as local_cluster
    from console.bench import SCHEMA
    from node import __version__

    if not local:
        raise ClusterError("the chaos soak restarts the nodes it kills, so it runs on a "
                           "local cluster it starts: add --local (and --nodes-sweep N for "
                           "N nodes, default 3)")
    if nodes < 2:
        raise ClusterError("the chaos soak needs 2 or more nodes (--nodes-sweep 3)")
    progress = progress or (lambda message: None)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cluster.json"
        progress(f"starting a {nodes}-node local cluster (faults allowed) ...")
        cluster = local_cluster.up(nodes, path=path,
                                   node_args=["--no-advertise", "--allow-faults"])
        try:
            chaos = asyncio.run(run_chaos(cluster, path, work.model, duration_s,
                                          work.concurrency[-1], work.gen_tokens, work.seed,
                                          progress))
        finally:
            local_cluster.down(path)
    from dataclasses import asdict

    return {"schema": SCHEMA, "created_unix": time.time(), "tool_version": __version__,
            "backend": "pipeline", "workload": asdict(work), "configurations": [],
            "scenarios": [], "chaos": chaos}
