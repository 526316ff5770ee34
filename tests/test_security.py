"""Cluster token, fault-injection permission and shutdown, on real node processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time

import aiohttp
import grpc
import openai
import psutil
import pytest

from console import ops
from console.client import ClusterError
from console.ops import Connection
from protos import cluster_pb2 as pb
from tests.conftest import spawn_node
from tests.helpers import (
    ROOT,
    addresses,
    eventually,
    load,
    mlx_cluster,
    node,
    serve_api,
    stop_process,
)

pytestmark = pytest.mark.cluster
TOKEN = "s3cret-token-for-tests"


async def test_mutating_rpcs_need_the_token(small_cluster, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    faulty = await asyncio.to_thread(
        small_cluster, 2, node_args=["--token-file", str(token_file), "--allow-faults"])
    strict = await asyncio.to_thread(small_cluster, 1, node_args=["--token-file", str(token_file)])
    addrs = addresses(faulty)

    for token in ("", "wrong-token"):
        async with ops.connect(addrs, Connection(token=token)) as anon:
            info = await anon[0].info()  # read-only calls stay open
            assert info.auth_required and info.faults_allowed
            plan = pb.Plan(model="synthetic:tiny", epoch=1, n_layers=8, shards=[
                pb.PlanShard(node_id=info.node_id, address=info.address, start_layer=0,
                             end_layer=7)])
            attempts = [anon[0].load(plan, pb.ModelOptions()), anon[0].unload(),
                        anon[0].inject(pb.FaultSpec(kind="latency", ms=5)), anon[0].heal(),
                        anon[0].shutdown()]
            for attempt in attempts:
                with pytest.raises(ClusterError, match="UNAUTHENTICATED.*cluster token"):
                    await attempt
            # the data plane too
            call = anon[0].stub.Forward(metadata=anon[0].metadata)
            # no write: the server rejects the stream as it opens (a write racing that
            # rejection can surface as INTERNAL on the client instead)
            with contextlib.suppress(grpc.aio.AioRpcError):
                await call.read()
            assert await call.code() == grpc.StatusCode.UNAUTHENTICATED
            after = await anon[0].info()
            assert not after.HasField("shard") and not after.faults  # nothing changed

    with_token = Connection(token=TOKEN)
    async with ops.connect(addrs, with_token) as good:
        plan, _ = await ops.load_plan(good, "synthetic:tiny", "", 0, "uniform",
                                      progress=lambda m: None)
        assert len(plan.shards) == 2
        request = pb.GenerateRequest(prompt_ids=[256, 65, 66], max_tokens=6, ignore_eos=True)
        # generate is open, and the nodes pass the token to each other on Forward
        async with node(addrs[0], Connection(token="")) as open_client:
            tokens = [e async for e in open_client.generate(request) if e.HasField("token")]
        assert len(tokens) == 6
        reply = await good[1].inject(pb.FaultSpec(kind="latency", ms=20, duration_s=30,
                                                  seed=1))
        assert [f.spec.kind for f in reply.active] == ["latency"]
        assert [f.spec.kind for f in (await good[1].info()).faults] == ["latency"]
        assert not (await good[1].heal()).active

    async with node(addresses(strict)[0], with_token) as strict_client:
        with pytest.raises(ClusterError, match="PERMISSION_DENIED.*--allow-faults"):
            await strict_client.inject(pb.FaultSpec(kind="kill"))
        assert await strict_client.healthy()
        pid = strict["nodes"][0]["pid"]
        assert await strict_client.shutdown("test")

    def stopped() -> bool:
        return not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE

    await eventually(stopped, 10, "the node to stop after Shutdown")


async def test_latency_fault_slows_tokens_and_heals(small_cluster):
    cluster = await asyncio.to_thread(small_cluster, 2, node_args=["--allow-faults"])
    async with ops.connect(addresses(cluster)) as cl:
        await ops.load_plan(cl, "synthetic:tiny", "", 0, "uniform", progress=lambda m: None)
        request = pb.GenerateRequest(prompt_ids=[256, 65], max_tokens=8, ignore_eos=True)

        async def duration() -> float:
            t0 = time.perf_counter()
            async for _ in cl[0].generate(request):
                pass
            return time.perf_counter() - t0

        base = await duration()
        await cl[1].inject(pb.FaultSpec(kind="latency", ms=50))
        slowed = await duration()
        assert slowed > base + 8 * 0.05 * 0.8  # each of 8 tokens crosses node 1 once
        hops = {s.name: s for s in (await cl[1].metrics()).latencies}
        assert hops["hop"].p99_s >= 0.045  # the delay shows in node 1's hop histogram
        await cl[1].heal()
        with pytest.raises(ClusterError, match="needs --ms"):
            await cl[1].inject(pb.FaultSpec(kind="latency"))
        with pytest.raises(ClusterError, match="unknown fault"):
            await cl[1].inject(pb.FaultSpec(kind="meteor"))


async def test_tls_between_console_and_nodes_and_between_nodes(tmp_path):
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    tls = ["--no-advertise", "--tls-cert", str(cert), "--tls-key", str(key),
           "--tls-ca", str(cert),
           "--token", TOKEN]
    procs, addrs = [], []
    try:
        for i in range(2):
            proc, ready = await asyncio.to_thread(spawn_node, tmp_path / f"r{i}.json", *tls,
                                                  "--state-dir", str(tmp_path / f"s{i}"))
            procs.append(proc)
            addrs.append(ready["address"])
        async with node(addrs[0], timeout_s=2.0) as plain:
            with pytest.raises(ClusterError):
                await plain.info()
        async with ops.connect(addrs, Connection(token=TOKEN, tls_ca=cert)) as secure:
            assert (await secure[0].info()).tls
            await ops.load_plan(secure, "synthetic:tiny", "", 0, "uniform",
                                progress=lambda m: None)
            request = pb.GenerateRequest(prompt_ids=[256, 72, 105], max_tokens=5,
                                         ignore_eos=True)
            got = [e async for e in secure[0].generate(request) if e.HasField("token")]
            assert len(got) == 5  # activations crossed a TLS Forward stream between the nodes
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)


async def test_the_gateway_off_loopback_needs_an_api_key_and_serves_openai_clients_with_it(
        cluster3, tmp_path):
    addrs = addresses(cluster3)
    refused = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "console.cli", "serve-api", "--host",
                         "127.0.0.2", "--port", "0", "--nodes", ",".join(addrs)],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
        env={k: v for k, v in os.environ.items() if k != "MLX_CLUSTER_API_KEY"})
    assert refused.returncode == 2 and "--api-key" in refused.stderr, refused.stderr
    assert "--insecure" in refused.stderr
    await load(addrs, "synthetic:tiny")
    key = "k3y-for-this-test"
    messages = [{"role": "user", "content": "hi"}]
    with serve_api(addrs, tmp_path / "keyed.json", "--host", "127.0.0.2",
                   "--api-key", key) as url:
        assert url.startswith("http://127.0.0.2:")
        async with aiohttp.ClientSession(base_url=url) as http:
            async with http.get("/health") as health:
                assert health.status == 200  # stays open
            for path in ("/v1/models", "/v1/cluster"):
                async with http.get(path) as denied:
                    assert denied.status == 401, path
                    assert (await denied.json())["error"]["code"] == "invalid_api_key"
            async with http.post("/v1/chat/completions", json={"messages": messages},
                                 headers={"Authorization": "Bearer wrong"}) as denied:
                assert denied.status == 401
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
        reply = await client.chat.completions.create(model="synthetic:tiny",
                                                     messages=messages, max_tokens=3)
        assert reply.usage.completion_tokens >= 1
        await client.close()
        wrong = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            await wrong.models.list()
        await wrong.close()
    with serve_api(addrs, tmp_path / "open.json", "--host", "127.0.0.2", "--insecure") as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="anything", max_retries=0)
        assert [m.id for m in (await client.models.list()).data] == ["synthetic:tiny"]
        await client.close()


async def test_a_node_off_loopback_needs_a_token_or_insecure_and_status_shows_it_open(
        tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))  # no token file yet
    monkeypatch.delenv("MLX_CLUSTER_TOKEN", raising=False)
    env = dict(os.environ)
    serve = [sys.executable, "-m", "node.cli", "serve", "--host", "127.0.0.2", "--port", "0",
             "--no-advertise", "--state-dir", str(tmp_path / "state")]
    refused = await asyncio.to_thread(subprocess.run, serve, capture_output=True, text=True,
                                      cwd=ROOT, timeout=60, env=env)
    assert refused.returncode == 1, refused.stderr
    assert "without a cluster token" in refused.stderr
    assert "mlx-cluster token new" in refused.stderr and "--insecure" in refused.stderr

    made = await asyncio.to_thread(mlx_cluster, "token", "new", env=env)
    assert made.returncode == 0, made.stderr
    token_file = tmp_path / "config" / "mlx-cluster-console" / "token"
    assert token_file.stat().st_mode & 0o077 == 0  # the user's only
    keyless = await asyncio.to_thread(subprocess.run, [*serve, "--api-port", "0"],
                                      capture_output=True, text=True, cwd=ROOT, timeout=60,
                                      env={k: v for k, v in env.items()
                                           if k != "MLX_CLUSTER_API_KEY"})
    assert keyless.returncode == 1 and "--api-key" in keyless.stderr, keyless.stderr
    proc, ready = await asyncio.to_thread(
        spawn_node, tmp_path / "keyed.json", "--host", "127.0.0.2", "--no-advertise",
        "--state-dir", str(tmp_path / "state"))
    try:
        assert ready["address"].startswith("127.0.0.2:")
        async with node(ready["address"], Connection(token="")) as anonymous:
            info = await anonymous.info()  # read-only calls stay open
            assert info.auth_required and not info.insecure
            with pytest.raises(ClusterError, match="token"):
                await anonymous.unload()
        # mlx-cluster reads the same token file
        status = await asyncio.to_thread(mlx_cluster, "unload", "--nodes", ready["address"],
                                         env=env)
        assert status.returncode == 0, status.stderr
    finally:
        stop_process(proc)

    token_file.unlink()
    proc, ready = await asyncio.to_thread(
        spawn_node, tmp_path / "open.json", "--host", "127.0.0.2", "--no-advertise",
        "--insecure", "--state-dir", str(tmp_path / "state"))
    try:
        status = await asyncio.to_thread(mlx_cluster, "status", "--nodes", ready["address"],
                                         "--json", env=env)
        row = json.loads(status.stdout)["nodes"][0]
        assert row["insecure"] is True and row["auth_required"] is False
        text = await asyncio.to_thread(mlx_cluster, "status", "--nodes", ready["address"],
                                       env=env)
        assert "OPEN: no token off loopback" in text.stdout
    finally:
        stop_process(proc)
