"""What the cluster tests share: node addresses of a started cluster, clients that close
themselves, loading a model, collecting generated tokens, running `mlx-cluster` (and its
HTTP API) as a user would, and waiting for a condition with a clear failure.

The fixtures that start clusters are in tests/conftest.py.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import pytest

from console import ops
from console.client import NodeClient
from console.ops import Connection
from protos import cluster_pb2 as pb

ROOT = Path(__file__).resolve().parents[1]


def addresses(cluster: dict) -> list[str]:
    """host:port of each node of a cluster from console.local (or the fixtures)."""
    return [n["address"] for n in cluster["nodes"]]


# ---------------------------------------------------------------- clients


@asynccontextmanager
async def node(address: str, connection: Connection | None = None,
               timeout_s: float = 10.0) -> AsyncIterator[NodeClient]:
    """One node's client, closed on the way out."""
    client = (connection or Connection()).client(address, timeout_s)
    try:
        yield client
    finally:
        await client.close()


async def node_info(address: str) -> pb.NodeInfo:
    async with node(address) as client:
        return await client.info()


async def load_backend(addrs: list[str], model: str, backend: str = "pipeline",
                       strategy: str = "uniform", layers: int = 0,
                       auto_reform: bool = False) -> tuple[pb.Plan, list[pb.ShardInfo]]:
    """Plan `model` over the nodes (in this order) and load it; the plan and the shards."""
    async with ops.connect(addrs) as clients:
        return await ops.load_plan(clients, model, "", layers, strategy,
                                   progress=lambda m: None, backend=backend,
                                   auto_reform=auto_reform)


async def load(addrs: list[str], model: str, strategy: str = "uniform",
               layers: int = 0) -> pb.Plan:
    """Load `model` as a gRPC pipeline; the plan."""
    plan, _ = await load_backend(addrs, model, "pipeline", strategy, layers)
    return plan


async def unload(addrs: list[str]) -> None:
    async with ops.connect(addrs) as clients:
        await asyncio.gather(*(c.unload() for c in clients))


async def token_events(address: str, prompt_ids: list[int], max_tokens: int,
                       ignore_eos: bool = False) -> list[pb.TokenEvent]:
    """The token events of one Generate sent to `address`."""
    request = pb.GenerateRequest(prompt_ids=prompt_ids, max_tokens=max_tokens,
                                 ignore_eos=ignore_eos)
    async with node(address) as client:
        return [e.token async for e in client.generate(request) if e.HasField("token")]


async def generate_ids(address: str, prompt_ids: list[int], max_tokens: int,
                       ignore_eos: bool = False) -> list[int]:
    """The token ids of one Generate sent to `address`."""
    return [e.token_id for e in await token_events(address, prompt_ids, max_tokens,
                                                   ignore_eos)]


async def forward_counters(address: str) -> tuple[int, ...]:
    """(forwards run, requests served by them, frames in, messages they came in) on one
    node."""
    async with node(address) as client:
        snap = await client.stub.WatchMetrics(pb.WatchRequest(hz=50)).read()
        return tuple(snap.counters[name] for name in (
            "forward_steps", "forward_rows", "frames_in", "forward_messages"))


# ---------------------------------------------------------------- the command line


def mlx_cluster(*args: str, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    """`mlx-cluster ARGS` in a subprocess, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "console.cli", *args], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=timeout)


@contextmanager
def serve_api(addrs: list[str], ready: Path, *args: str) -> Iterator[str]:
    """`mlx-cluster serve-api --port 0 ARGS` in its own process for these nodes, writing
    its ready file at `ready`; its URL. Stopped with SIGTERM afterwards."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "console.cli", "serve-api", "--port", "0", "--nodes",
         ",".join(addrs), "--ready-file", str(ready), *args], cwd=ROOT,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        env=dict(os.environ, HF_HUB_OFFLINE="1"))

    def listening() -> bool:
        assert proc.poll() is None, proc.stderr.read()
        try:
            return json.loads(ready.read_text())["url"]
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            return False  # not written yet, or half written

    try:
        url = eventually_sync(listening, 30, "the gateway to listen")
        yield url
    finally:
        stop_process(proc)


def stop_process(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL if it is still there after 10 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


# ---------------------------------------------------------------- waiting


async def eventually(condition: Callable, timeout: float, what: str, interval: float = 0.1):
    """Call `condition` (a plain or async function) until it returns something true, and
    return that. After `timeout` seconds the test fails, saying it waited for `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(interval)


def eventually_sync(condition: Callable, timeout: float, what: str, interval: float = 0.05):
    """`eventually` outside an event loop (fixtures, subprocess start-up)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)
