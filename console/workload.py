"""A benchmark workload and how one run of it is measured.

Prompts are exact: a given number of token ids, seeded, drawn from the model's ordinary
vocabulary; each request generates a fixed number of tokens with EOS ignored. A level
releases every request at once with at most `c` in flight and records TTFT, TPOT,
inter-token and end-to-end latency (p50/p90/p95/p99), throughput and failures by kind.
Requests go to the entry node through a `Route`, which survives the entry node's loss: a
request goes on as a continuation on the survivors' new entry node (node.resume).
console/bench.py runs levels over clusters; console/scenarios.py adds faults.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc

from console import ops
from console.client import ClusterError, NodeClient, describe_rpc_error
from node.plan import DEFAULT_STRATEGY
from node.resume import NoEntry, resumable
from protos import cluster_pb2 as pb

PERCENTILES = (50, 90, 95, 99)


@dataclass
class Workload:
    model: str
    prompt_tokens: int = 64
    gen_tokens: int = 32
    requests: int = 8
    concurrency: list[int] = field(default_factory=lambda: [1])
    warmup: int = 1
    repeats: int = 1
    strategy: str = DEFAULT_STRATEGY
    seed: int = 0
    timeout_s: float = 120.0
    backends: list[str] = field(default_factory=lambda: ["pipeline"])
    microbatches: int = 0  # decode groups in flight round a pipeline (0: one per node)
    cpus_per_node: int = 0  # --local: node i runs on its own K cores (0: unpinned)
    oversubscribe: bool = False  # --local: more nodes x cores than the machine has


@dataclass
class RequestResult:
    ok: bool
    ttft_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    e2e_s: float = 0.0
    tokens: int = 0
    token_ids: list[int] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)  # monotonic arrival of each token
    resumed: int = 0  # continuations on a new entry node
    failure: str = ""  # timeout | network | memory | other
    error: str = ""

    @property
    def max_gap_s(self) -> float:
        """The longest wait between two of this request's tokens, as the client saw it."""
        times = self.token_times
        return max((b - a for a, b in zip(times, times[1:])), default=0.0)


class Route:
    """Where a benchmark's requests go: the entry node of `clients`, asked for once and
    again only when a request has lost it; each request goes on across entry nodes."""

    def __init__(self, clients: list[NodeClient]) -> None:
        self.clients = clients
        self.address = ""  # the entry node's, once known

    async def find_entry(self, gone: set[str], again: bool) -> str:
        if self.address and self.address not in gone and not again:
            return self.address
        try:
            client, _ = await ops.entry_client([c for c in self.clients
                                                if c.address not in gone])
        except ops.EntryPending:
            raise  # resumable waits for it
        except ClusterError as e:
            raise NoEntry(str(e)) from None
        self.address = client.address
        return self.address

    def channel(self, address: str) -> grpc.aio.Channel:
        return next(c for c in self.clients if c.address == address).channel

    def stream(self, request: pb.GenerateRequest,
               on_resume=None) -> AsyncIterator[pb.GenerateEvent]:
        metadata = self.clients[0].metadata if self.clients else ()
        return resumable(request, self.find_entry, self.channel, metadata, on_resume)


def percentiles(values: list[float]) -> dict[str, float]:
    """p50/p90/p95/p99 (nearest rank), mean and max; zeros when empty."""
    if not values:
        return {**{f"p{q}": 0.0 for q in PERCENTILES}, "mean": 0.0, "max": 0.0, "n": 0}
    ordered = sorted(values)
    out = {f"p{q}": ordered[min(len(ordered) - 1, max(0, -(-q * len(ordered) // 100) - 1))]
           for q in PERCENTILES}
    return {**out, "mean": statistics.fmean(ordered), "max": ordered[-1], "n": len(ordered)}


def failure_kind(error: Exception) -> str:
    text = str(error)
    if "DEADLINE_EXCEEDED" in text or "timed out" in text or isinstance(error, TimeoutError):
        return "timeout"
    if "UNAVAILABLE" in text or "unreachable" in text:
        return "network"
    if "RESOURCE_EXHAUSTED" in text or "memory" in text.lower():
        return "memory"
    return "other"


def prompt_ids(vocab: int, n: int, seed: int, avoid: set[int]) -> list[int]:
    """n token ids from the ordinary vocabulary (no special/control ids), seeded."""
    rng = random.Random(seed)
    low = 300 if vocab > 1000 else 32  # skip control tokens / byte controls
    high = min(vocab, 256) if vocab < 1000 else vocab
    out = []
    while len(out) < n:
        t = rng.randrange(low, high)
        if t not in avoid:
            out.append(t)
    return out


def workload_prompts(model: str, count: int, tokens: int, seed: int) -> list[list[int]]:
    """`count` seeded prompts of exactly `tokens` ids from the model's vocabulary."""
    from node.models import resolve
    from node.tokenizers import prompt_tokenizer

    source = resolve(model)
    avoid = set(prompt_tokenizer(source).eos_ids)
    vocab = int(source.config["vocab_size"])
    return [prompt_ids(vocab, tokens, seed + i, avoid) for i in range(count)]


async def one_request(route: Route, ids: list[int], gen: int,
                      timeout_s: float) -> RequestResult:
    """One request of `gen` tokens (EOS ignored), measured; it survives the entry node."""
    request = pb.GenerateRequest(prompt_ids=ids, max_tokens=gen, ignore_eos=True,
                                 timeout_s=timeout_s)
    t0 = time.perf_counter()
    result = RequestResult(ok=False)

    def resumed(address: str, tokens: int) -> None:
        result.resumed += 1

    try:
        async with asyncio.timeout(timeout_s + 30):
            async for event in route.stream(request, resumed):
                if event.HasField("token"):
                    result.token_ids.append(event.token.token_id)
                    result.token_times.append(time.monotonic())
                    if len(result.token_ids) == 1:
                        result.ttft_s = time.perf_counter() - t0
                    else:
                        result.itl_s.append(event.token.latency_s)
    except (grpc.aio.AioRpcError, ClusterError, NoEntry, TimeoutError) as e:
        error = describe_rpc_error(route.address or "the entry node", e) if isinstance(
            e, grpc.aio.AioRpcError) else str(e)
        result.failure, result.error = failure_kind(e), error[:300]
        result.e2e_s = time.perf_counter() - t0
        result.tokens = len(result.token_ids)
        return result
    result.e2e_s = time.perf_counter() - t0
    result.tokens = len(result.token_ids)
    result.ok = result.tokens == gen
    if not result.ok:
        result.failure, result.error = "other", f"{result.tokens} of {gen} tokens"
    return result


async def run_level(entry: Route, prompts: list[list[int]], gen: int, concurrency: int,
                    timeout_s: float, progress) -> tuple[list[RequestResult], float]:
    """All requests released together, at most `concurrency` in flight."""
    gate = asyncio.Semaphore(concurrency)
    done = 0

    async def guarded(ids: list[int]) -> RequestResult:
        nonlocal done
        async with gate:
            r = await one_request(entry, ids, gen, timeout_s)
        done += 1
        progress(done, len(prompts))
        return r

    t0 = time.perf_counter()
    results = await asyncio.gather(*(guarded(p) for p in prompts))
    return list(results), time.perf_counter() - t0


def summarise(results: list[RequestResult], wall_s: float, concurrency: int) -> dict:
    ok = [r for r in results if r.ok]
    failures: dict[str, int] = {}
    for r in results:
        if not r.ok:
            failures[r.failure] = failures.get(r.failure, 0) + 1
    tokens = sum(r.tokens for r in results)
    tpot = [statistics.fmean(r.itl_s) for r in ok if r.itl_s]
    single = [(r.tokens - 1) / sum(r.itl_s) for r in ok if r.itl_s and sum(r.itl_s) > 0]
    return {
        "concurrency": concurrency, "requests": len(results), "succeeded": len(ok),
        "success_rate": len(ok) / len(results) if results else 0.0, "failures": failures,
        "wall_s": wall_s, "output_tokens": tokens,
        "aggregate_tokens_per_s": tokens / wall_s if wall_s > 0 else 0.0,
        "single_stream_tokens_per_s": statistics.fmean(single) if single else 0.0,
        "ttft_s": percentiles([r.ttft_s for r in ok]),
        "tpot_s": percentiles(tpot),
        "itl_s": percentiles([x for r in ok for x in r.itl_s]),
        "itl_samples": [round(x, 6) for r in ok for x in r.itl_s][:20000],  # for CDFs
        "e2e_s": percentiles([r.e2e_s for r in ok]),
    }
