"""Benchmark: serve-api beside mlx_lm.server, on this machine and model, in one run.

Starts three systems and keeps them all up for the whole run:

- `python -m mlx_lm.server` on the model's directory, one process, with the BLAS the
  nodes use (node/blas.py `openblas_env`) and HF_HUB_OFFLINE=1;
- `mlx-cluster serve-api` over a 1-node local cluster;
- `mlx-cluster serve-api` over a 3-node local cluster (uniform pipeline plan).

Each gets one warm-up request, then `--repeats` interleaved rounds (the system order
rotates every round); in a round every system serves concurrency 1 and 8 (`--levels`),
`--rounds` x concurrency streamed chat requests per level, through the official `openai`
client (AsyncOpenAI): the same prompts for every system, max_tokens 64, temperature 0.
Completion tokens come from the usage chunk when the server sends one
(stream_options.include_usage; mlx_lm.server does) and otherwise from the content chunks
(one per token; the gateway's). EOS is not ignored (mlx_lm.server has no such option), so
the mean tokens per request is printed to show the answers are of like length.
Throughput is aggregate: completion tokens of a level / its wall time. Within a round
the systems take turns level by level. Prints the median tok/s per system and level, its
ratio to mlx_lm.server at the same level, the median of each round's own ratio (paired:
drift that slows every system for a while cancels out of it), and the median time to
the first content chunk (TTFT) of the level's requests; --json OUT writes every number,
which `mlx-cluster report OUT ...` turns into a "Compared with mlx_lm.server" section.

    .venv/bin/python tests/bench/peers.py [--model smollm2-135m] [--repeats 3]
    .venv/bin/python tests/bench/peers.py --repeats 1 --json /tmp/peers.json

--model needs a model directory (bundled, local or a downloaded hub model) since
mlx_lm.server loads it too; --dtype applies to the nodes only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import openai  # noqa: E402

from console import local  # noqa: E402
from console.report import PEERS_SCHEMA  # noqa: E402
from node.blas import openblas_env, openblas_path  # noqa: E402
from tests.bench.common import add_model_arguments  # noqa: E402
from tests.bench.concurrency import load  # noqa: E402
from tests.helpers import stop_process as stop  # noqa: E402

REFERENCE = "mlx_lm.server"
PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a bicycle works to a ten-year-old, step by step.",
    "Describe a walk through a busy market in the morning.",
    "List ten things to pack for a week of camping and say why each matters.",
    "Tell me about the history of the printing press.",
    "Write a letter from a cat to its owner about the new dog.",
    "How do plants turn sunlight into food? Explain in detail.",
    "Describe the perfect rainy Sunday afternoon.",
]
START_TIMEOUT_S = 180.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(ready, proc: subprocess.Popen, what: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
            sys.exit(f"{what} did not start (exit {proc.returncode}):\n{tail}")
        time.sleep(0.1)


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as reply:
            return reply.status == 200
    except OSError:
        return False


def start_mlx_lm(stack: contextlib.ExitStack, model_dir: Path, tmp: Path) -> str:
    port, log = free_port(), tmp / "mlx_lm.log"
    env = openblas_env()
    env["HF_HUB_OFFLINE"] = "1"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mlx_lm.server", "--model",
                                 str(model_dir), "--host", "127.0.0.1", "--port", str(port),
                                 "--log-level", "WARNING"], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    stack.callback(stop, proc)
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: answers(url), proc, REFERENCE, log)
    return url


def start_cluster(stack: contextlib.ExitStack, n: int, args, tmp: Path,
                  node_args: tuple[str, ...] = (), name: str = "") -> str:
    """A local cluster of n nodes with the model loaded, and serve-api over it; its url."""
    name = name or f"{n}"
    path = tmp / f"cluster{name}.json"
    cluster = local.up(n, path=path, node_args=["--no-advertise", *node_args])
    stack.callback(local.down, path)
    addresses = [nd["address"] for nd in cluster["nodes"]]
    asyncio.run(load(addresses, args.model, args.dtype, args.layers))
    ready, log = tmp / f"api{name}.json", tmp / f"api{name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "console.cli", "serve-api", "--port",
                                 "0", "--nodes", ",".join(addresses), "--ready-file",
                                 str(ready)], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    stack.callback(stop, proc)
    wait_until(lambda: ready_url(ready), proc, f"serve-api over {n} node(s)", log)
    return ready_url(ready)


def ready_url(ready: Path) -> str | None:
    """The gateway's url from its ready file, once the file is there and whole."""
    try:
        return json.loads(ready.read_text())["url"]
    except (OSError, ValueError, KeyError):
        return None


async def one(api: openai.AsyncOpenAI, model: str, prompt: str,
              tokens: int) -> tuple[int, float]:
    """(completion tokens, seconds to the first content chunk) of one streamed chat."""
    t0 = time.perf_counter()
    stream = await api.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=tokens,
        temperature=0, stream=True, stream_options={"include_usage": True})
    chunks, used, ttft = 0, None, 0.0
    async for chunk in stream:
        if chunk.usage is not None:
            used = chunk.usage.completion_tokens
        content = sum(1 for c in chunk.choices if c.delta and c.delta.content)
        if content and not chunks:
            ttft = time.perf_counter() - t0
        chunks += content
    return (used if used is not None else chunks), ttft


async def level(api: openai.AsyncOpenAI, model: str, concurrency: int, requests: int,
                tokens: int) -> tuple[float, int, list[float]]:
    """(aggregate tok/s, completion tokens, each request's TTFT) of `requests` requests,
    `concurrency` at once."""
    gate = asyncio.Semaphore(concurrency)

    async def gated(i: int) -> tuple[int, float]:
        async with gate:
            return await one(api, model, PROMPTS[i % len(PROMPTS)], tokens)

    t0 = time.perf_counter()
    got = await asyncio.gather(*(gated(i) for i in range(requests)))
    count = sum(n for n, _ in got)
    return count / (time.perf_counter() - t0), count, [t for _, t in got]


async def measure(systems: dict[str, tuple[str, str]], args) -> dict:
    clients = {name: openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused",
                                        max_retries=0, timeout=600)
               for name, (url, _) in systems.items()}
    tps = {name: {c: [] for c in args.levels} for name in systems}
    ttft = {name: {c: [] for c in args.levels} for name in systems}
    tokens = {name: {c: 0 for c in args.levels} for name in systems}
    try:
        for name, (_, model) in systems.items():
            await one(clients[name], model, PROMPTS[0], args.tokens)  # warm-up
        names = list(systems)
        for r in range(args.repeats):
            order = names[r % len(names):] + names[:r % len(names)]
            # level by level, every system in turn: what is compared runs close in time
            for c in args.levels:
                for name in order:
                    rate, n, firsts = await level(clients[name], systems[name][1], c,
                                                  c * args.rounds, args.tokens)
                    tps[name][c].append(rate)
                    ttft[name][c] += firsts
                    tokens[name][c] += n
                    print(f"  round {r + 1}: {name:<20} concurrency {c:>2}: "
                          f"{rate:7.2f} tok/s ({n / (c * args.rounds):.1f} tokens/request, "
                          f"TTFT p50 {statistics.median(firsts) * 1e3:.1f} ms)", flush=True)
    finally:
        for client in clients.values():
            await client.close()
    return {"tps": tps, "tokens": tokens, "ttft": ttft}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--tokens", type=int, default=64, help="max_tokens per request")
    parser.add_argument("--levels", default="1,8", help="concurrency levels")
    parser.add_argument("--rounds", type=int, default=2,
                        help="requests per level = concurrency x rounds")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--nodes", default="1,3", help="local cluster sizes for serve-api")
    parser.add_argument("--json", type=Path, help="write the numbers here")
    args = parser.parse_args()
    args.levels = [int(x) for x in args.levels.split(",")]
    sizes = [int(x) for x in args.nodes.split(",")]

    from node.models import resolve

    model_dir = resolve(args.model, layers=args.layers).path
    if model_dir is None:
        sys.exit(f"{args.model} has no model directory for mlx_lm.server to load")
    print(f"model {args.model} ({model_dir}), {args.tokens} max tokens, {args.rounds} "
          f"round(s) x concurrency requests per level, {args.repeats} repeat(s), "
          f"{os.cpu_count()} CPUs, BLAS {openblas_path() or 'reference'}", flush=True)
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        systems = {REFERENCE: (start_mlx_lm(stack, model_dir, Path(tmp)), "default_model")}
        for n in sizes:
            name = f"serve-api {n} node{'s' if n > 1 else ''}"
            systems[name] = (start_cluster(stack, n, args, Path(tmp)), args.model)
        print("all systems up: " + ", ".join(systems), flush=True)
        got = asyncio.run(measure(systems, args))

    medians = {s: {c: statistics.median(v) for c, v in lv.items()}
               for s, lv in got["tps"].items()}
    ratios = {s: {c: m / medians[REFERENCE][c] if medians[REFERENCE][c] else 0.0
                  for c, m in lv.items()} for s, lv in medians.items()}
    # the median of each round's own ratio: a round's systems ran minutes apart at most,
    # so drift on a shared machine (all systems slower for a while) cancels out of it
    paired = {s: {c: statistics.median(x / y for x, y in zip(v, got["tps"][REFERENCE][c]) if y)
                  for c, v in lv.items()} for s, lv in got["tps"].items()}
    per_request = {s: {c: n / (c * args.rounds * args.repeats) for c, n in lv.items()}
                   for s, lv in got["tokens"].items()}
    ttft = {s: {c: statistics.median(v) for c, v in lv.items()}
            for s, lv in got["ttft"].items()}
    head = "".join(f" {f'c={c} tok/s':>11} {'ratio':>6} {'paired':>6} {'tok/req':>7} "
                   f"{'TTFT ms':>8}" for c in args.levels)
    print(f"\nmedians of {args.repeats} round(s); ratio is to {REFERENCE} at the same "
          f"concurrency (paired: the median of each round's ratio); TTFT is the median "
          f"over every request after the warm-up one\n{'system':<20}{head}")
    for s in medians:
        print(f"{s:<20}" + "".join(f" {medians[s][c]:11.2f} {ratios[s][c]:6.2f} "
                                   f"{paired[s][c]:6.2f} {per_request[s][c]:7.1f} "
                                   f"{ttft[s][c] * 1e3:8.1f}" for c in args.levels))
    if args.json:
        args.json.write_text(json.dumps({
            "schema": PEERS_SCHEMA, "model": args.model, "model_dir": str(model_dir),
            "dtype": args.dtype,
            "max_tokens": args.tokens, "rounds": args.rounds, "repeats": args.repeats,
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                        "blas": openblas_path() or "reference"},
            "systems": list(medians), "reference": REFERENCE, "levels": args.levels,
            "tok_s": {s: {str(c): v for c, v in lv.items()} for s, lv in got["tps"].items()},
            "median_tok_s": {s: {str(c): v for c, v in lv.items()} for s, lv in medians.items()},
            "ratio": {s: {str(c): v for c, v in lv.items()} for s, lv in ratios.items()},
            "paired_ratio": {s: {str(c): v for c, v in lv.items()}
                             for s, lv in paired.items()},
            "tokens_per_request": {s: {str(c): v for c, v in lv.items()}
                                   for s, lv in per_request.items()},
            "median_ttft_s": {s: {str(c): v for c, v in lv.items()} for s, lv in ttft.items()},
            "ttft_s": {s: {str(c): v for c, v in lv.items()} for s, lv in got["ttft"].items()},
        }, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
