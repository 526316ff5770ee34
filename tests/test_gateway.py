"""The OpenAI-compatible gateway (`mlx-cluster serve-api`), driven by the official `openai`
client against real node processes."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import aiohttp
import openai
import pytest

from console import ops
from node.openai_api import TYPES
from tests.helpers import (
    addresses,
    eventually,
    forward_counters,
    load,
    mlx_cluster,
    serve_api,
)

pytestmark = pytest.mark.cluster
QUESTION = "What is the capital of France?"


@pytest.fixture
def gateway(cluster3, tmp_path: Path):
    """`mlx-cluster serve-api --port 0` in its own process, for the session cluster."""
    with serve_api(addresses(cluster3), tmp_path / "api.json", "--max-body-bytes",
                   "65536") as url:
        yield url


async def test_openai_client_gets_the_text_mlx_cluster_generate_gets(cluster3, gateway):
    addrs = addresses(cluster3)
    await load(addrs, "smollm2-135m")
    cli = mlx_cluster("generate", "--nodes", ",".join(addrs), "--chat", "--prompt", QUESTION,
                      "--max-tokens", "24", "--json", env=dict(os.environ))
    assert cli.returncode == 0, cli.stderr
    want = json.loads(cli.stdout)["text"]
    assert "Paris" in want
    client = openai.AsyncOpenAI(base_url=f"{gateway}/v1", api_key="unused")
    models = await client.models.list()
    assert [m.id for m in models.data] == ["smollm2-135m"]
    messages = [{"role": "user", "content": QUESTION}]
    reply = await client.chat.completions.create(model="smollm2-135m", messages=messages,
                                                 max_tokens=24, temperature=0)
    assert reply.choices[0].message.content == want
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens == json.loads(cli.stdout)["completion_tokens"]
    # concurrent requests share forwards on every node (continuous batching) and still
    # get exactly the text each gets alone
    before = await forward_counters(addrs[1])
    together = await asyncio.gather(*(client.chat.completions.create(
        model="smollm2-135m", messages=messages, max_tokens=24) for _ in range(4)))
    assert [r.choices[0].message.content for r in together] == [want] * 4
    steps, rows, frames, sent = (
        a - b for a, b in zip(await forward_counters(addrs[1]), before))
    assert rows > steps  # the middle node ran forwards for several requests at once
    assert frames > sent  # and the frames of a forward travelled as one message
    stream = await client.chat.completions.create(model="smollm2-135m", messages=messages,
                                                  max_tokens=24, stream=True)
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "stop"
    stream = await client.chat.completions.create(  # the usage as a last chunk, on request
        model="smollm2-135m", messages=messages, max_tokens=24, stream=True,
        stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == (
        reply.usage.completion_tokens)
    assert chunks[-2].choices[0].finish_reason == "stop"
    # completions, a stop string, a seed: same request twice, same text
    done = await client.completions.create(model="smollm2-135m", prompt="The capital of "
                                           "France is", max_tokens=12, stop=["."])
    assert done.choices[0].finish_reason == "stop" and "." not in done.choices[0].text
    sampled = [(await client.completions.create(
        model="smollm2-135m", prompt="Once upon a time", max_tokens=8, temperature=0.9,
        top_p=0.95, seed=7)).choices[0].text for _ in range(2)]
    assert sampled[0] == sampled[1]
    await client.close()


async def test_bad_requests_get_openai_errors_and_the_cluster_keeps_serving(cluster3,
                                                                           gateway):
    addrs = addresses(cluster3)
    await load(addrs, "synthetic:tiny")
    client = openai.AsyncOpenAI(base_url=f"{gateway}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError, match="not loaded"):
        await client.chat.completions.create(model="gpt-4", messages=[
            {"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="context is 2048 tokens"):
        await client.completions.create(model="synthetic:tiny", prompt="x" * 3000)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        await client.completions.create(model="synthetic:tiny", prompt="hi", temperature=9)
    json_type = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(base_url=gateway) as http:
        async with http.post("/v1/chat/completions", data=b"{not json",
                             headers=json_type) as bad:
            assert bad.status == 400
            assert (await bad.json())["error"]["type"] == "invalid_request_error"
        async with http.post("/v1/completions", headers=json_type,
                             data=json.dumps({"prompt": "a" * 100_000}).encode()) as big:
            assert big.status == 413
            assert (await big.json())["error"]["code"] == "request_too_large"
        # each typed parameter with a value of another type: 400 naming it; n=2 too;
        # an unknown field is ignored
        wrong = {(str,): 7, (bool,): "yes", (dict,): [1], (int,): 1.5, (int, float): True,
                 (str, list): 5}
        for name, (kinds, _) in TYPES.items():
            for value in [wrong[kinds]] + ([2] if name == "n" else []):
                async with http.post("/v1/chat/completions", json={
                        "model": "synthetic:tiny", "max_tokens": 1, "unknown_field": {"a": 1},
                        "messages": [{"role": "user", "content": "hi"}], name: value}) as bad:
                    error = (await bad.json())["error"]
                    assert (bad.status, error["param"]) == (400, name), (name, value, error)
                    assert name in error["message"]
        async with http.get("/v1/nothing-here") as missing:
            assert missing.status == 404 and "error" in await missing.json()
        # a client that disconnects mid-stream: its request is cancelled, caches freed
        async with http.post("/v1/completions", json={
                "model": "synthetic:tiny", "prompt": "go on", "max_tokens": 2000,
                "stream": True}) as response:
            seen = 0
            async for line in response.content:
                seen += line.startswith(b"data: ")
                if seen >= 3:
                    break
            response.close()  # drop the connection mid-stream
    async with ops.connect(addrs) as nodes:
        async def idle() -> bool:
            infos = await asyncio.gather(*(n.info() for n in nodes))
            return all(i.active_requests == 0 for i in infos)

        await eventually(idle, 10, "every node to drop the abandoned request")
    after = await client.completions.create(model="synthetic:tiny", prompt="still there?",
                                            max_tokens=4)
    assert after.usage.completion_tokens >= 1
    await client.close()
