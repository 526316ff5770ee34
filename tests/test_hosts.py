"""Real hosts, not loopback: the README's "Three machines" recipe, word for word, on
network namespaces joined by a bridge (tests/netns.py).

Each node runs `mlx-node serve --host 0.0.0.0` in a namespace of its own (10.77.0.11-13),
with a home of its own (its own node id, its own copy of the token file), and the console
runs in a fourth (10.77.0.14): zeroconf goes over the bridge, hidden states cross it on the
data port, and the openai client reaches `serve-api` from outside. Only addresses inside
these namespaces are contacted. Without root or namespaces the module is skipped, saying
why.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest

from console import ops
from protos import cluster_pb2 as pb
from tests import netns
from tests.helpers import ROOT, eventually, eventually_sync

pytestmark = [pytest.mark.cluster,
              pytest.mark.skipif(bool(netns.unavailable()),
                                 reason=f"multi-host tests: {netns.unavailable()}")]

BIN = Path(sys.executable).parent
PORT = 50051  # the recipe's default ports, each namespace has its own
API_PORT = 52415
QUESTION = "What is the capital of France?"
QUESTIONS = [QUESTION, "Name three planets.", "What is water made of?", "Who wrote Hamlet?"]
TOKENS = 16


def command(name: str) -> list[str]:
    """`mlx-cluster` / `mlx-node` as installed, as a user types them."""
    script = BIN / name
    module = {"mlx-cluster": "console.cli", "mlx-node": "node.cli"}[name]
    return [str(script)] if script.exists() else [sys.executable, "-m", module]


def home_env(home: Path) -> dict:
    """A machine of its own: its home and config dirs (where the token file and the node
    id live); no cluster file, no token in the environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XDG_", "MLX_CLUSTER"))}
    env.update(HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"),
               XDG_DATA_HOME=str(home / ".local/share"),
               XDG_STATE_HOME=str(home / ".local/state"),
               MLX_CLUSTER=str(home / "no-cluster.json"), HF_HUB_OFFLINE="1",
               MLX_CLUSTER_CACHE=os.environ["MLX_CLUSTER_CACHE"])
    return env


@dataclass
class Cluster:
    bed: netns.Bed
    homes: list[Path]
    nodes: list[subprocess.Popen]  # by host, None once stopped
    console_env: dict
    api_url: str
    api_key: str
    outputs: dict  # what each step of the recipe printed

    @property
    def console(self) -> netns.Host:
        return self.bed.hosts[3]

    def address(self, i: int) -> str:
        return f"{self.bed.hosts[i].ip}:{PORT}"

    def mlx_cluster(self, *args: str, env: dict | None = None,
                    timeout: float = 120) -> subprocess.CompletedProcess:
        return self.console.run([*command("mlx-cluster"), *args], capture_output=True,
                                text=True, cwd=ROOT, env=env or self.console_env,
                                timeout=timeout)


def start_node(bed: netns.Bed, i: int, home: Path) -> subprocess.Popen:
    with open(home / "node.log", "ab") as log:  # the process keeps its own copy
        return bed.hosts[i].popen([*command("mlx-node"), "serve", "--host", "0.0.0.0",
                                   "--name", f"studio-{i + 1}", "--memory-budget", "4GiB"],
                                  cwd=ROOT, env=home_env(home), stdout=log,
                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def discovered(cluster: Cluster, want: int) -> dict | bool:
    out = cluster.mlx_cluster("discover", "--json", "--timeout", "2")
    found = json.loads(out.stdout or "{}").get("nodes", []) if out.returncode == 0 else []
    return {"stdout": out.stdout, "nodes": found} if len(found) >= want else False


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    """The recipe up to `serve-api`, each step's output kept for the tests to check."""
    base = tmp_path_factory.mktemp("hosts")
    homes = [base / name for name in ("studio-1", "studio-2", "studio-3", "laptop")]
    for home in homes:
        home.mkdir()
    with netns.testbed(4, subnet="10.77.0.0/24") as bed:
        outputs: dict = {}
        c = Cluster(bed, homes, [], home_env(homes[3]), "", "", outputs)
        # on the laptop: mlx-cluster token new
        made = c.mlx_cluster("token", "new")
        assert made.returncode == 0, made.stderr
        token_file = homes[3] / ".config/mlx-cluster-console/token"
        assert token_file.exists(), made.stdout + made.stderr
        # a machine without the token refuses to serve beyond loopback
        refused = bed.hosts[0].run([*command("mlx-node"), "serve", "--host", "0.0.0.0"],
                                   capture_output=True, text=True, cwd=ROOT,
                                   env=home_env(homes[0]), timeout=60)
        outputs["refused"] = refused
        # scp the token to each studio, then mlx-node serve --host 0.0.0.0 on each
        for home in homes[:3]:
            (home / ".config/mlx-cluster-console").mkdir(parents=True)
            shutil.copy(token_file, home / ".config/mlx-cluster-console/token")
        c.nodes = [start_node(bed, i, homes[i]) for i in range(3)]
        found = eventually_sync(lambda: discovered(c, 3), 90, "three nodes on zeroconf", 0.5)
        outputs["discover"] = found
        outputs["status"] = c.mlx_cluster("status", "--json")
        outputs["load"] = c.mlx_cluster("load", "--model", "smollm2-135m", timeout=300)
        assert outputs["load"].returncode == 0, outputs["load"].stderr
        c.api_key = secrets.token_urlsafe(32)
        with open(homes[3] / "api.log", "ab") as api_log:
            api = c.console.popen([*command("mlx-cluster"), "serve-api", "--host", "0.0.0.0",
                                   "--api-key", c.api_key], cwd=ROOT, env=c.console_env,
                                  stdout=subprocess.DEVNULL, stderr=api_log)
        c.api_url = f"http://{c.console.ip}:{API_PORT}/v1"

        def api_up() -> bool:
            assert api.poll() is None, (homes[3] / "api.log").read_text()
            try:
                return bool(openai.OpenAI(base_url=c.api_url, api_key=c.api_key,
                                          max_retries=0, timeout=5).models.list().data)
            except openai.APIError:
                return False

        eventually_sync(api_up, 60, "serve-api to answer")
        yield c
        for i, home in enumerate(homes[:3]):  # a failing test shows what the nodes said
            print(f"--- studio-{i + 1}:\n" + (home / "node.log").read_text()[-3000:])


async def node_counters(c: Cluster, i: int) -> dict:
    async with ops.connect([c.address(i)], ops.Connection(token=token(c))) as (client,):
        snap = await client.stub.WatchMetrics(pb.WatchRequest(hz=50)).read()
        return dict(snap.counters)


def token(c: Cluster) -> str:
    return (c.homes[3] / ".config/mlx-cluster-console/token").read_text().strip()


def test_the_three_machines_recipe_works_across_hosts_with_host_0_0_0_0(cluster):
    """token new; a studio without the token refused; mlx-node serve --host 0.0.0.0 on each
    studio; discover and status list each node at its own address (not 0.0.0.0); load;
    serve-api --api-key; the openai client gets "Paris", with hidden states across the
    bridge on the data port through all three hosts."""
    c = cluster
    refused = c.outputs["refused"]
    assert refused.returncode == 1 and "without a cluster token" in refused.stderr
    want = {c.address(i) for i in range(3)}
    assert {n["address"] for n in c.outputs["discover"]["nodes"]} == want
    status = c.outputs["status"]
    assert status.returncode == 0, status.stderr
    rows = json.loads(status.stdout)["nodes"]
    assert {r["address"] for r in rows} == want and all(r["up"] for r in rows)
    assert "0.0.0.0" not in c.outputs["discover"]["stdout"] + status.stdout
    assert "epoch" in c.outputs["load"].stdout + c.outputs["load"].stderr

    before = [asyncio.run(node_counters(c, i)) for i in range(3)]
    client = openai.OpenAI(base_url=c.api_url, api_key=c.api_key, max_retries=0, timeout=120)
    answer = client.chat.completions.create(
        model="smollm2-135m", messages=[{"role": "user", "content": QUESTION}],
        max_tokens=12, temperature=0).choices[0].message.content
    assert "Paris" in answer
    after = [asyncio.run(node_counters(c, i)) for i in range(3)]
    for i in range(3):  # every host computed, and took its frames on its data port
        assert after[i]["forward_steps"] > before[i].get("forward_steps", 0), i
        assert after[i]["frames_in"] > before[i].get("frames_in", 0), i
        assert after[i].get("data_links", 0) >= 1, i
    with pytest.raises(openai.AuthenticationError):  # the API key is needed off loopback
        openai.OpenAI(base_url=c.api_url, api_key="wrong", max_retries=0).models.list()
    # a console without the token may look, but not change the cluster
    no_token = home_env(c.homes[3] / "elsewhere")
    unload = c.mlx_cluster("unload", "--nodes", c.address(0), env=no_token)
    assert unload.returncode != 0 and "token" in unload.stderr.lower(), unload.stderr


async def chat_all(client: openai.AsyncOpenAI, on_piece=None,
                   questions: list[str] = QUESTIONS) -> list[list[str]]:
    async def one(question: str) -> list[str]:
        pieces = []
        stream = await client.chat.completions.create(
            model="smollm2-135m", messages=[{"role": "user", "content": question}],
            max_tokens=TOKENS, temperature=0, stream=True, extra_body={"ignore_eos": True})
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
                if on_piece is not None:
                    on_piece()
        return pieces

    return list(await asyncio.gather(*(one(q) for q in questions)))


async def test_killing_the_entry_host_under_api_load_loses_no_request(cluster):
    """The node holding layer 0 is killed in its namespace while 4 streams run through
    serve-api: every stream ends with its fault-free text, and so does a request sent right
    after the kill, before the survivors have re-planned."""
    c = cluster
    client = openai.AsyncOpenAI(base_url=c.api_url, api_key=c.api_key, max_retries=0,
                                timeout=180)
    reference = await chat_all(client)
    async with ops.connect([c.address(i) for i in range(3)]) as clients:
        _, entry = await ops.entry_client(clients)
    victim = [c.address(i) for i in range(3)].index(entry.address)
    total, seen = sum(map(len, reference)), 0
    killed = asyncio.Event()

    def count() -> None:
        nonlocal seen
        seen += 1
        if seen == total // 3:
            os.killpg(c.nodes[victim].pid, signal.SIGKILL)
            killed.set()

    async def right_after() -> list[str]:
        await killed.wait()
        return await chat_all(client, questions=QUESTIONS[:1])

    t0 = time.monotonic()
    got, after = await asyncio.gather(chat_all(client, count), right_after())
    assert killed.is_set()
    assert got == reference
    assert after == reference[:1]
    survivors = [c.address(i) for i in range(3) if i != victim]
    async with ops.connect(survivors) as clients:
        infos = await ops.live_infos(clients)
    newest = max(infos, key=lambda i: i.shard.epoch)
    assert entry.node_id not in {s.node_id for s in newest.plan.shards}
    assert {s.address for s in newest.plan.shards} == set(survivors)
    print(f"entry host killed under load: all answers exact in {time.monotonic() - t0:.1f} s")


async def test_a_new_host_with_the_token_joins_the_serving_plan_by_zeroconf(cluster):
    """A fresh node (a new home: no plan it remembers, no --join), given the cluster's
    token and started where the killed entry node was: it finds the cluster's nodes on
    zeroconf (they announce the token's digest) and is taken into their plan."""
    c = cluster
    home = c.homes[0].parent / "studio-4"
    (home / ".config/mlx-cluster-console").mkdir(parents=True)
    shutil.copy(c.homes[3] / ".config/mlx-cluster-console/token",
                home / ".config/mlx-cluster-console/token")
    dead = next(i for i, p in enumerate(c.nodes) if p.poll() is not None)
    c.nodes[dead] = start_node(c.bed, dead, home)
    survivors = [c.address(i) for i in range(3) if i != dead]

    async def joined() -> pb.Plan | None:
        async with ops.connect(survivors) as clients:
            _, entry = await ops.entry_client(clients)
        return entry.plan if c.address(dead) in {s.address for s in entry.plan.shards} else None

    plan = await eventually(joined, 60, "the new host in the plan")
    assert len(plan.shards) == 3


def test_sigterm_stops_every_host_cleanly_at_the_same_moment(cluster):
    """The nodes still up get SIGTERM together, as at the end of the recipe: each exits
    with status 0 (not SIGABRT), its peers stopping at the same moment."""
    up = [p for p in cluster.nodes if p.poll() is None]
    assert up
    for proc in up:
        os.killpg(proc.pid, signal.SIGTERM)
    codes = [proc.wait(30) for proc in up]
    assert codes == [0] * len(up)
