"""A local cluster: N node processes on 127.0.0.1, started and stopped as one.

`up` spawns `mlx-node serve --port 0` processes, waits until each has written its ready
file and answers health checks, and records them in the cluster file (env MLX_CLUSTER or
the user state dir) that later commands read when no --nodes is given. `down` stops
exactly the processes that file names.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from console.client import ClusterError, NodeClient


def cluster_file() -> Path:
    env = os.environ.get("MLX_CLUSTER")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_state_dir

    return Path(user_state_dir("mlx-cluster-console")) / "cluster.json"


def read_cluster(path: Path | None = None) -> dict | None:
    path = path or cluster_file()
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as e:
        raise ClusterError(f"cluster file {path} is corrupt ({e}); delete it") from e


def _is_our_node(pid: int) -> bool:
    try:
        cmdline = " ".join(psutil.Process(pid).cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
    return "node.cli" in cmdline or "mlx-node" in cmdline


def live_nodes(cluster: dict) -> list[dict]:
    return [n for n in cluster.get("nodes", []) if _is_our_node(n["pid"])]


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def cpu_lists(n: int, per_node: int, oversubscribe: bool = False) -> list[str]:
    """`mlx-node serve --cpus` for each of n nodes of `per_node` cores: node i gets the
    i-th K cores this process may use. More than there are is refused unless
    `oversubscribe` (then the cores are dealt round again)."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
        list(range(os.cpu_count() or 1))
    if per_node < 1:
        raise ClusterError("--cpus-per-node must be 1 or more")
    if n * per_node > len(cores) and not oversubscribe:
        raise ClusterError(f"{n} nodes x {per_node} cores = {n * per_node} cores, but this "
                           f"machine gives {len(cores)}: use fewer nodes or cores per node, "
                           "or --oversubscribe to share cores (the figures then measure the "
                           "sharing, not the nodes)")
    return [",".join(str(cores[(i * per_node + k) % len(cores)]) for k in range(per_node))
            for i in range(n)]


def up(n: int, memory_budgets: list[str] | None = None, path: Path | None = None,
       timeout_s: float = 60.0, log=lambda msg: None, node_args: list[str] = (),
       cpus_per_node: int = 0, oversubscribe: bool = False) -> dict:
    """Start n nodes on loopback and write the cluster file; returns its contents.
    `node_args` go to every `mlx-node serve` (e.g. --allow-faults, --token-file F).
    `cpus_per_node` K: node i runs on its own K cores (`cpu_lists`)."""
    path = path or cluster_file()
    existing = read_cluster(path)
    if existing and live_nodes(existing):
        raise ClusterError(f"a local cluster from {path} is still running "
                           f"({len(live_nodes(existing))} nodes); run: mlx-cluster local down")
    if n < 1:
        raise ClusterError("a cluster needs at least one node (-n 1 or more)")
    if memory_budgets and len(memory_budgets) != n:
        raise ClusterError(f"--memory-budgets has {len(memory_budgets)} values for {n} nodes")
    cpus = cpu_lists(n, cpus_per_node, oversubscribe) if cpus_per_node else None
    base = path.parent / (path.stem + ".d")
    base.mkdir(parents=True, exist_ok=True)
    procs = []
    nodes = []
    deadline = time.monotonic() + timeout_s
    try:
        for i in range(n):
            name = f"local-{i}"
            ready = base / f"{name}.ready.json"
            ready.unlink(missing_ok=True)
            log_path = base / f"{name}.log"
            cmd = [sys.executable, "-m", "node.cli", "serve", "--host", "127.0.0.1", "--port",
                   "0", "--name", name, "--state-dir", str(base / name), "--ready-file",
                   str(ready)]
            if memory_budgets:
                cmd += ["--memory-budget", memory_budgets[i]]
            if cpus:
                cmd += ["--cpus", cpus[i]]
            cmd += list(node_args)
            with open(log_path, "ab") as out:
                proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
            procs.append((name, proc, ready, log_path))
            log(f"started {name} (pid {proc.pid})")
        for name, proc, ready, log_path in procs:
            while not ready.exists():
                if proc.poll() is not None:
                    raise ClusterError(f"{name} exited with code {proc.returncode}; its log "
                                       f"({log_path}):\n{_tail(log_path)}")
                if time.monotonic() > deadline:
                    raise ClusterError(f"{name} did not come up within {timeout_s:.0f} s; log "
                                       f"{log_path}:\n{_tail(log_path)}")
                time.sleep(0.05)
            info = json.loads(ready.read_text())
            nodes.append({"name": name, "address": info["address"], "pid": proc.pid,
                          "node_id": info["node_id"], "log": str(log_path),
                          **({"api": info["api"]} if info.get("api") else {})})
        asyncio.run(_wait_healthy([nd["address"] for nd in nodes], deadline))
    except BaseException:
        for _, proc, _, _ in procs:
            _stop_pid(proc.pid)
        raise
    cluster = {"kind": "local", "created": time.time(), "nodes": nodes}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(cluster, indent=2))
    os.replace(tmp, path)
    return cluster


async def _wait_healthy(addresses: list[str], deadline: float) -> None:
    clients = [NodeClient(a, timeout_s=2.0) for a in addresses]
    try:
        for client in clients:
            while not await client.healthy():
                if time.monotonic() > deadline:
                    raise ClusterError(f"node {client.address} is not healthy")
                await asyncio.sleep(0.1)
    finally:
        await asyncio.gather(*(c.close() for c in clients))


def _stop_pid(pid: int, grace_s: float = 5.0) -> bool:
    """SIGTERM, wait, then SIGKILL. True if the process is gone."""
    try:
        proc = psutil.Process(pid)
        proc.send_signal(signal.SIGTERM)
        proc.wait(grace_s)
    except psutil.NoSuchProcess:
        return True
    except psutil.TimeoutExpired:
        try:
            proc.kill()
            proc.wait(grace_s)
        except (psutil.NoSuchProcess, psutil.TimeoutExpired):
            pass
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def down(path: Path | None = None) -> list[dict]:
    """Stop the nodes the cluster file names (only if they are ours); remove the file."""
    path = path or cluster_file()
    cluster = read_cluster(path)
    if cluster is None:
        return []
    stopped, survivors = [], []
    for node in cluster.get("nodes", []):
        if _is_our_node(node["pid"]):
            (stopped if _stop_pid(node["pid"]) else survivors).append(node)
    if survivors:  # keep a record of what still runs, so a later `down` can retry
        path.write_text(json.dumps(dict(cluster, nodes=survivors), indent=2))
        raise ClusterError("could not stop pid(s) "
                           + ", ".join(str(n["pid"]) for n in survivors))
    path.unlink(missing_ok=True)
    return stopped
