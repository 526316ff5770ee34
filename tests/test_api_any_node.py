"""The HTTP API on any node, and what moved from the gateway to the entry node: chat
messages templated there and stop strings matched there, as it generates.

Real node processes and real gRPC; the HTTP side is driven by the official `openai`
client, against `mlx-cluster serve-api` and against nodes started with `--api-port`.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

import aiohttp
import openai
import pytest

from console.client import ClusterError
from node.metrics import NodeMetrics
from node.runner import TokenStream
from node.tokenizers import ByteTokenizer
from protos import cluster_pb2 as pb
from tests.helpers import addresses, eventually, load, mlx_cluster, node, serve_api

QUESTION = "What is the capital of France?"
MESSAGES = [{"role": "user", "content": QUESTION}]
STOP = "Paris"


def chat(**fields) -> pb.GenerateRequest:
    return pb.GenerateRequest(messages=[pb.ChatMessage(**m) for m in MESSAGES], **fields)


async def run(address: str, request: pb.GenerateRequest
              ) -> tuple[list[pb.TokenEvent], pb.GenerateDone]:
    async with node(address, timeout_s=120) as client:
        events = [e async for e in client.generate(request)]
    return [e.token for e in events if e.HasField("token")], events[-1].done


async def tokens_generated(address: str) -> int:
    async with node(address) as client:
        return (await client.metrics()).tokens_generated


# ---------------------------------------------------------------- the entry node


def test_a_continuation_matches_stop_strings_as_the_first_run_did():
    """Text held back because it may begin a stop string is not sent before a fail-over;
    a continuation (replayed tokens, `emitted_chars` already shown) holds and cuts it just
    as the uninterrupted run does, wherever the run was cut."""
    tokenizer, text = ByteTokenizer(), "Hello world. The end"
    request = pb.GenerateRequest(stop=["d. T", "xyz"])

    def generate(ids: list[int], stream: TokenStream) -> list[str]:
        out = []
        for token in ids:
            out.append(stream.accept(token, 0.0).token.text)
            if not stream.more:
                break
        return out

    ids = list(text.encode())
    whole = generate(ids, TokenStream(tokenizer, request, 1, 64, [], 0, NodeMetrics()))
    assert "".join(whole) == "Hello worl"
    for cut in range(1, len(whole)):  # every point before the stop string completes
        shown = whole[:cut]
        stream = TokenStream(tokenizer, request, 1, 64, ids[:cut], len("".join(shown)),
                             NodeMetrics())
        assert "".join(shown + generate(ids[cut:], stream)) == "Hello worl", cut
        done = stream.done(1).done
        assert (done.finish_reason, done.completion_tokens) == ("stop", len(whole))


@pytest.mark.cluster
async def test_a_stop_string_ends_generation_on_the_node(cluster3, tmp_path: Path):
    addrs = addresses(cluster3)
    await load(addrs, "smollm2-135m")
    entry = addrs[0]  # uniform plan in this order: layer 0 on the first node
    tokens, done = await run(entry, chat(max_tokens=48, ignore_eos=True))
    text = "".join(t.text for t in tokens)
    assert STOP in text
    # the token whose text completes the stop string is the last one generated
    upto = next(i + 1 for i in range(len(tokens))
                if STOP in "".join(t.text for t in tokens[:i + 1]))
    before = await tokens_generated(entry)
    stopped, done = await run(entry, chat(max_tokens=48, ignore_eos=True, stop=[STOP, "zz"]))
    assert "".join(t.text for t in stopped) + done.tail_text == text[:text.index(STOP)]
    assert (done.finish_reason, done.completion_tokens) == ("stop", upto)
    assert [t.token_id for t in stopped] == [t.token_id for t in tokens[:upto]]
    assert await tokens_generated(entry) - before == upto  # no step after the stop string

    with serve_api(addrs, tmp_path / "api.json") as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused")
        before = await tokens_generated(entry)
        reply = await client.chat.completions.create(
            model="smollm2-135m", messages=MESSAGES, max_tokens=48, temperature=0,
            stop=[STOP], extra_body={"ignore_eos": True})
        assert reply.choices[0].message.content == text[:text.index(STOP)]
        assert reply.choices[0].finish_reason == "stop"
        assert reply.usage.completion_tokens == upto
        assert await tokens_generated(entry) - before == upto
        stream = await client.chat.completions.create(
            model="smollm2-135m", messages=MESSAGES, max_tokens=48, stop=STOP, stream=True,
            extra_body={"ignore_eos": True})
        chunks = [c async for c in stream]
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == (
            text[:text.index(STOP)])
        assert chunks[-1].choices[0].finish_reason == "stop"
        with pytest.raises(openai.BadRequestError, match="at most 4"):
            await client.completions.create(model="smollm2-135m", prompt="hi",
                                            stop=["a", "b", "c", "d", "e"])
        await client.close()


@pytest.mark.cluster
async def test_chat_messages_give_the_tokens_of_generate_chat(cluster3, tmp_path: Path):
    addrs = addresses(cluster3)
    await load(addrs, "smollm2-135m")
    cli = mlx_cluster("generate", "--nodes", ",".join(addrs), "--chat", "--prompt", QUESTION,
                      "--max-tokens", "24", "--json", env=dict(os.environ))
    assert cli.returncode == 0, cli.stderr
    want = json.loads(cli.stdout)
    tokens, done = await run(addrs[0], chat(max_tokens=24))
    assert [t.token_id for t in tokens] == want["token_ids"]
    assert done.prompt_tokens == want["prompt_tokens"]
    with serve_api(addrs, tmp_path / "api.json") as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        reply = await client.chat.completions.create(model="smollm2-135m", messages=MESSAGES,
                                                     max_tokens=24, temperature=0)
        assert reply.choices[0].message.content == want["text"]
        assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (
            want["prompt_tokens"], want["completion_tokens"])
        with pytest.raises(openai.BadRequestError, match="role"):
            await client.chat.completions.create(
                model="smollm2-135m", messages=[{"role": "wizard", "content": "hi"}])
        await client.close()
    # the node itself refuses what the gateway would have: a clear error, and it serves on
    for bad, says in ((chat(prompt="and a prompt"), "not both"),
                      (pb.GenerateRequest(messages=[pb.ChatMessage(role="", content="x")]),
                       "role"),
                      (chat(stop=["x" * 300]), "stop string"),
                      (chat(stop=[""]), "stop string")):
        with pytest.raises(ClusterError, match=f"INVALID_ARGUMENT: .*{says}"):
            await run(addrs[0], bad)
    tokens, _ = await run(addrs[0], chat(max_tokens=24))
    assert [t.token_id for t in tokens] == want["token_ids"]


# ---------------------------------------------------------------- the API on every node


@pytest.fixture
def api_cluster(small_cluster) -> tuple[dict, list[str]]:
    """Three nodes, each serving the HTTP API too (`mlx-node serve --api-port 0`): the
    cluster and the URLs of their APIs."""
    cluster = small_cluster(3, node_args=["--no-advertise", "--api-port", "0"])
    return cluster, [n["api"] for n in cluster["nodes"]]


def api_client(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0,
                              timeout=180)


async def ask(url: str, max_tokens: int = 16, ignore_eos: bool = False) -> str:
    client = api_client(url)
    try:
        reply = await client.chat.completions.create(
            model="smollm2-135m", messages=MESSAGES, max_tokens=max_tokens, temperature=0,
            extra_body={"ignore_eos": ignore_eos})
    finally:
        await client.close()
    return reply.choices[0].message.content


@pytest.mark.cluster
async def test_a_non_entry_nodes_api_answers_as_serve_api_does_even_after_the_entry_dies(
        api_cluster, tmp_path):
    cluster, apis = api_cluster
    addrs = addresses(cluster)
    await load(addrs, "smollm2-135m")
    with serve_api(addrs, tmp_path / "api.json") as url:
        want = await ask(url)
    assert "Paris" in want
    assert await asyncio.gather(ask(apis[1]), ask(apis[2])) == [want, want]
    client = openai.AsyncOpenAI(base_url=f"{apis[2]}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in (await client.models.list()).data] == ["smollm2-135m"]
    stream = await client.chat.completions.create(model="smollm2-135m", messages=MESSAGES,
                                                  max_tokens=16, stream=True)
    assert "".join([c.choices[0].delta.content or "" async for c in stream]) == want
    with pytest.raises(openai.APIStatusError, match="does not load models") as refused:
        await client.post("/models/load", body={"model": "synthetic:tiny"}, cast_to=dict)
    assert refused.value.status_code == 501
    await client.close()
    async with aiohttp.ClientSession() as http, http.get(f"{apis[2]}/health") as health:
        assert health.status == 200
        assert (await health.json())["nodes_up"] == 3  # itself and the nodes of its plan

    # the entry node dies mid-answer: the stream from another node's API goes on (a
    # continuation on the survivors' new entry) and reads as one uninterrupted answer;
    # later requests to that API are answered too
    want = await ask(apis[1], max_tokens=40, ignore_eos=True)
    client = api_client(apis[1])
    stream = await client.chat.completions.create(
        model="smollm2-135m", messages=MESSAGES, max_tokens=40, temperature=0, stream=True,
        extra_body={"ignore_eos": True})
    parts = []
    async for piece in stream:
        parts.append(piece.choices[0].delta.content or "")
        if len(parts) == 4:
            os.kill(cluster["nodes"][0]["pid"], signal.SIGKILL)  # the entry node: layer 0
    await client.close()
    assert "".join(parts) == want

    async def answered() -> str | None:
        try:
            return await ask(apis[1], max_tokens=40, ignore_eos=True)
        except openai.APIError:
            return None  # the survivors are still re-planning

    assert await eventually(answered, 90, "an answer after the entry node died", 1.0) == want
