"""Replacing the plan under traffic is not an outage: requests streaming through the
gateway while the same model is reloaded with another plan (another entry node) all
complete, with the text they get without the reload, and none gets a 503."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import openai
import pytest

from console import ops
from protos import cluster_pb2 as pb
from tests.helpers import addresses, serve_api

pytestmark = pytest.mark.cluster
MODEL = "synthetic:tiny"
PROMPTS = ["one fish", "two fish", "red fish", "blue fish"]
TOKENS = 160


async def one(client: openai.AsyncOpenAI, prompt: str, on_piece=lambda: None) -> list[str]:
    pieces = []
    stream = await client.completions.create(model=MODEL, prompt=prompt, stream=True,
                                             max_tokens=TOKENS, temperature=0,
                                             extra_body={"ignore_eos": True})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            pieces.append(chunk.choices[0].text)
            on_piece()
    return pieces


async def stream_all(client: openai.AsyncOpenAI, on_piece=lambda: None) -> list[list[str]]:
    return list(await asyncio.gather(*(one(client, p, on_piece) for p in PROMPTS)))


async def test_reloading_with_a_new_entry_node_under_traffic_drops_no_request(
        cluster3, tmp_path: Path):
    addrs = addresses(cluster3)
    async with ops.connect(addrs) as clients:
        first, _ = await ops.load_plan(clients, MODEL, "", 0, "uniform",
                                       progress=lambda m: None)
    with serve_api(addrs, tmp_path / "api.json") as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        reference = await stream_all(client)
        seen, reload, late = 0, None, None

        async def replace():
            # the same model, the nodes in the opposite order: a new entry node
            async with ops.connect(addrs[::-1]) as clients:
                plan, _ = await ops.load_plan(clients, MODEL, "", 0, "uniform",
                                              progress=lambda m: None)
            return plan

        loaded_at: list[int] = []  # pieces streamed when the new plan was loaded

        def count() -> None:
            nonlocal seen, reload, late
            seen += 1
            if seen == len(PROMPTS) * TOKENS // 5:
                reload = asyncio.ensure_future(replace())
                reload.add_done_callback(lambda _: loaded_at.append(seen))
            elif seen == len(PROMPTS) * TOKENS // 5 + 2:  # a new request during the load
                late = asyncio.ensure_future(one(client, PROMPTS[0]))

        t0 = time.perf_counter()
        got = await stream_all(client, count)  # an APIStatusError (a 503) fails the test
        print(f"streams took {time.perf_counter() - t0:.2f} s; new plan loaded after "
              f"{loaded_at} of {seen} pieces")
        total = seen
        second = await reload
        assert await late == reference[0]  # it waited for the new plan, then was served
        await client.close()
    assert second.epoch > first.epoch
    assert second.shards[0].node_id != first.shards[0].node_id
    assert got == reference
    assert loaded_at[0] < total  # the streams went on under the new plan


async def test_a_new_split_loads_beside_the_serving_plan_which_serves_meanwhile(cluster3):
    """smollm2-135m reloaded in another split while 4 greedy streams run: every node loads
    its new shard beside the old one (memory allows both), the old plan keeps streaming
    tokens during the load, all switch at once, and every stream ends with the text of an
    undisturbed run. (`tests/bench/reload_gap.py` measures the longest stall.)"""
    addrs = addresses(cluster3)
    request = pb.GenerateRequest(prompt="Tell me about the history of Paris.", chat=True,
                                 max_tokens=48, ignore_eos=True)
    async with ops.connect(addrs) as clients:
        first, _ = await ops.load_plan(clients, "smollm2-135m", "", 0, "uniform",
                                       progress=lambda m: None)
        reference = (await ops.generate(clients, request)).token_ids
        arrivals: list[float] = []
        said: list[tuple[float, str]] = []
        started = asyncio.Event()

        async def stream() -> list[int]:
            ids = []
            async for event in ops.stream(clients, request):
                if event.HasField("token"):
                    ids.append(event.token.token_id)
                    arrivals.append(time.monotonic())
                    if len(arrivals) == 12:
                        started.set()
            return ids

        async def reload() -> pb.Plan:
            await started.wait()
            said.append((time.monotonic(), "start"))
            plan, _ = await ops.load_plan(clients, "smollm2-135m", "", 0,
                                          "manual:0-14,15-24,25-29",
                                          progress=lambda m: said.append((time.monotonic(), m)))
            return plan

        *got, second = await asyncio.gather(*(stream() for _ in range(4)), reload())
    assert got == [reference] * 4
    assert [(s.start_layer, s.end_layer) for s in second.shards] == [(0, 14), (15, 24),
                                                                    (25, 29)]
    assert second.epoch > first.epoch
    assert sum("staged beside the serving plan" in m for _, m in said) == 3
    begun = said[0][0]
    switched = next(t for t, m in said if m.startswith("  switched 3 node(s)"))
    during = [t for t in arrivals if begun < t < switched]
    assert during, "no token streamed while the new split loaded"
    gaps = [b - a for a, b in zip(sorted(arrivals), sorted(arrivals)[1:])]
    print(f"{len(during)} tokens streamed during the {switched - begun:.2f} s load; longest "
          f"gap between tokens {max(gaps):.2f} s")
