"""One runner interface and one way to sample: both backends implement `Runner`, nothing
outside the runner modules asks which backend it holds, and a sampler's draws depend only
on the seed and the position (that a seeded request gives the same tokens on every
backend is checked on a real cluster in tests/test_ring.py)."""

from __future__ import annotations

import ast
import asyncio
from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx
import pytest

from node.engine import Engine
from node.errors import PeerUnavailable, RequestTimeout
from node.metrics import NodeMetrics
from node.models import load_shard, resolve
from node.peers import PeerChannels
from node.pipeline import Pipeline
from node.ring import RingGroup
from node.runner import Runner, next_token
from node.sampling import RequestSampler, Sampling, sample_rows
from protos import cluster_pb2 as pb
from tests.helpers import ROOT

TINY_PROMPT = [256, *b"the ring"]


def _plan(backend: str = "pipeline", parallel: str = "") -> pb.Plan:
    return pb.Plan(model="synthetic:tiny", epoch=1, n_layers=8, backend=backend,
                   parallel=parallel, shards=[pb.PlanShard(node_id="a", address="127.0.0.1:1",
                                                           start_layer=0, end_layer=7)])


def test_both_backends_implement_the_runner_protocol():
    source = resolve("synthetic:tiny")
    engine = Engine(load_shard(source, 0, 7), ThreadPoolExecutor(1))
    pipeline = Pipeline("a", _plan(), engine, NodeMetrics(), PeerChannels())
    group = RingGroup("a", _plan("mlx-ring", "pipeline"), pb.ModelOptions(), source, None,
                      NodeMetrics())
    for runner in (pipeline, group):
        assert isinstance(runner, Runner), type(runner).__name__
        assert runner.is_first and runner.entry_address == "127.0.0.1:1"
        assert runner.shard_info().model == "synthetic:tiny"


def test_no_module_asks_which_backend_it_holds():
    """isinstance on a runner class only inside the runner modules themselves."""
    runners = {"Pipeline", "RingGroup"}
    found = []
    for path in sorted((ROOT / "node").glob("*.py")) + sorted((ROOT / "console").rglob("*.py")):
        if path.name in ("pipeline.py", "ring.py"):
            continue
        for call in ast.walk(ast.parse(path.read_text())):
            if (isinstance(call, ast.Call) and getattr(call.func, "id", "") == "isinstance"
                    and len(call.args) == 2):
                names = {n.id for n in ast.walk(call.args[1]) if isinstance(n, ast.Name)}
                if names & runners:
                    found.append(f"{path.relative_to(ROOT)}:{call.lineno}")
    assert not found, found


def test_a_seeded_sampler_repeats_and_differs_from_greedy():
    logits = mx.random.normal((1, 64), key=mx.random.key(3))
    seeded = [RequestSampler(Sampling(temperature=1.5, top_p=0.95, seed=11)) for _ in range(2)]
    draws = [[sample_rows(logits, [s])[0] for _ in range(24)] for s in seeded]
    assert draws[0] == draws[1]  # the same seed: the same sequence
    greedy = sample_rows(logits, [RequestSampler(Sampling())])[0]
    assert greedy == int(mx.argmax(logits).item())
    assert set(draws[0]) != {greedy}  # it did sample


def test_a_sampler_resumed_mid_sequence_draws_what_the_whole_run_drew():
    """A continuation on another node starts sampling again at position p: its key comes
    from (seed, p), so it draws the uninterrupted run's tokens."""
    logits = mx.random.normal((1, 64), key=mx.random.key(5))
    whole = RequestSampler(Sampling(temperature=1.5, top_p=0.95, seed=11), position=10)
    run = [sample_rows(logits, [whole])[0] for _ in range(12)]
    resumed = RequestSampler(Sampling(temperature=1.5, top_p=0.95, seed=11), position=16)
    assert [sample_rows(logits, [resumed])[0] for _ in range(6)] == run[6:]
    assert len(set(run)) > 1


async def test_a_token_wait_returns_the_token_raises_errors_and_times_out_clearly():
    queue: asyncio.Queue = asyncio.Queue()
    asyncio.get_running_loop().call_later(0.01, queue.put_nowait, (7, 0.5, None))
    assert await next_token(queue, 5.0) == (7, 0.5, None)  # it came while waiting
    queue.put_nowait(PeerUnavailable("the next shard is gone"))
    with pytest.raises(PeerUnavailable, match="next shard is gone"):
        await next_token(queue, 5.0)
    with pytest.raises(RequestTimeout, match="no token came back within 0 s"):
        await next_token(queue, 0.05)
    # a request whose client went away is cancelled, not timed out; the queue stays usable
    waiting = asyncio.ensure_future(next_token(queue, 5.0))
    await asyncio.sleep(0.01)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    queue.put_nowait((8, 0.1, -0.5))
    assert await next_token(queue, 5.0) == (8, 0.1, -0.5)
