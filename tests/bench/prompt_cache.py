"""Benchmark: what the prefix cache saves on the next turn of a chat, through the gateway.

Starts two local clusters of `--nodes` nodes (default 3) with the model loaded and
`serve-api` over each: one with the nodes' default prefix cache, one with
`--prompt-cache-bytes 0` (off). For each of `--repeats` conversations (each starts
differently, so its first turn finds nothing cached) it sends, through the official
`openai` client, streamed and greedy:

1. turn 1: a system message and a long user message, about `--prompt-tokens` tokens;
2. turn 2: the same messages, turn 1's answer as the assistant's, and a short question.

Time to first token (TTFT) is the time from sending a request to its first content
chunk. Prints each turn's TTFT, turn 2's TTFT / turn 1's for each system (the cache's
target: <= 0.3), and the prompt sizes from the usage chunk. Both systems give the same
answers (greedy); the script checks it.

    .venv/bin/python tests/bench/prompt_cache.py [--model smollm2-135m] [--nodes 3]
    .venv/bin/python tests/bench/prompt_cache.py --prompt-tokens 1000 --repeats 3 --json OUT
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import openai  # noqa: E402

from node.blas import openblas_path  # noqa: E402
from tests.bench.common import add_model_arguments  # noqa: E402
from tests.bench.peers import start_cluster  # noqa: E402

SYSTEMS = {"prefix cache on": (), "prefix cache off": ("--prompt-cache-bytes", "0")}
TOPICS = ["lighthouses", "bicycles", "markets", "camping", "printing", "cats", "plants",
          "rain", "bridges", "trains"]


def long_message(k: int, tokens: int) -> str:
    """A user message of roughly `tokens` tokens (about 4 characters each), different for
    each conversation from its first words on."""
    topic = TOPICS[k % len(TOPICS)]
    line = (f"Note {{i}} on {topic}: people have written about {topic} for a long time, and "
            f"each account adds something small to what we know. ")
    text, i = f"Conversation {k}. Here are my notes about {topic}.\n", 0
    while len(text) < 4 * tokens:
        text += line.format(i=i)
        i += 1
    return text + f"\nSummarise these notes about {topic} in two sentences."


async def turn(api: openai.AsyncOpenAI, model: str, messages: list[dict],
               tokens: int) -> tuple[float, str, int]:
    """(TTFT in seconds, the answer, prompt tokens) of one streamed greedy request."""
    t0 = time.perf_counter()
    stream = await api.chat.completions.create(
        model=model, messages=messages, max_tokens=tokens, temperature=0, stream=True,
        stream_options={"include_usage": True})
    ttft, text, prompt = None, "", 0
    async for chunk in stream:
        if chunk.usage is not None:
            prompt = chunk.usage.prompt_tokens
        for choice in chunk.choices:
            if choice.delta and choice.delta.content:
                if ttft is None:
                    ttft = time.perf_counter() - t0
                text += choice.delta.content
    return (ttft if ttft is not None else time.perf_counter() - t0), text, prompt


async def conversation(api: openai.AsyncOpenAI, model: str, k: int, args) -> dict:
    messages = [{"role": "system", "content": "You are a careful assistant."},
                {"role": "user", "content": long_message(k, args.prompt_tokens)}]
    ttft1, answer, prompt1 = await turn(api, model, messages, args.tokens)
    messages += [{"role": "assistant", "content": answer},
                 {"role": "user", "content": "Now say which note matters most, and why."}]
    ttft2, answer2, prompt2 = await turn(api, model, messages, args.tokens)
    return {"ttft1_s": ttft1, "ttft2_s": ttft2, "ratio": ttft2 / ttft1,
            "prompt1_tokens": prompt1, "prompt2_tokens": prompt2, "answers": [answer, answer2]}


async def measure(urls: dict[str, str], args) -> dict[str, list[dict]]:
    apis = {name: openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0,
                                     timeout=600) for name, url in urls.items()}
    runs: dict[str, list[dict]] = {name: [] for name in urls}
    try:
        for api in apis.values():  # warm-up: a short chat, unlike the ones measured
            await turn(api, args.model, [{"role": "user", "content": "Hello!"}], 4)
        for k in range(args.repeats):
            for name, api in apis.items():
                run = await conversation(api, args.model, k, args)
                runs[name].append(run)
                print(f"  conversation {k + 1}: {name:<17} turn 1 TTFT {run['ttft1_s']:6.3f} s "
                      f"({run['prompt1_tokens']} prompt tokens), turn 2 TTFT "
                      f"{run['ttft2_s']:6.3f} s ({run['prompt2_tokens']}), ratio "
                      f"{run['ratio']:.3f}", flush=True)
    finally:
        for api in apis.values():
            await api.close()
    return runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--nodes", type=int, default=3, help="nodes in each local cluster")
    parser.add_argument("--prompt-tokens", type=int, default=1000,
                        help="about this many tokens in turn 1's prompt")
    parser.add_argument("--tokens", type=int, default=32, help="max_tokens per turn")
    parser.add_argument("--repeats", type=int, default=3, help="conversations per system")
    parser.add_argument("--json", type=Path, help="write the numbers here")
    args = parser.parse_args()
    print(f"model {args.model}, {args.nodes} node(s) per cluster, turn 1 of about "
          f"{args.prompt_tokens} tokens, {args.tokens} max tokens, {args.repeats} "
          f"conversation(s), {os.cpu_count()} CPUs, BLAS {openblas_path() or 'reference'}",
          flush=True)
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        urls = {name: start_cluster(stack, args.nodes, args, Path(tmp), node_args,
                                    f"{args.nodes}-{k}")
                for k, (name, node_args) in enumerate(SYSTEMS.items())}
        runs = asyncio.run(measure(urls, args))

    same = all(a["answers"] == b["answers"] for a, b in zip(*runs.values()))
    print(f"\nmedians of {args.repeats} conversation(s)\n{'system':<17} {'turn 1 TTFT':>12} "
          f"{'turn 2 TTFT':>12} {'turn 2 / turn 1':>16}")
    summary = {}
    for name, rs in runs.items():
        m = {key: statistics.median(r[key] for r in rs) for key in ("ttft1_s", "ttft2_s",
                                                                    "ratio")}
        summary[name] = m
        print(f"{name:<17} {m['ttft1_s']:11.3f}s {m['ttft2_s']:11.3f}s {m['ratio']:16.3f}")
    print(f"same answers with the cache on and off: {'yes' if same else 'NO'}")
    if args.json:
        args.json.write_text(json.dumps({
            "model": args.model, "nodes": args.nodes, "prompt_tokens": args.prompt_tokens,
            "max_tokens": args.tokens, "cpus": os.cpu_count(), "runs": runs,
            "medians": summary, "same_answers": same}, indent=2))
        print(f"wrote {args.json}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
