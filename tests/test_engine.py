"""Shard engine and model specs in one process: wire format, synthetic layers, caches."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from node.engine import Engine, Tuning
from node.errors import BadFrame, FrameGap, ModelError
from node.models import load_shard, resolve, synthetic_full_model
from node.sampling import Sampling
from node.synthetic import TINY_ARCHS
from node.tokenizers import ByteTokenizer
from node.wire import decode_tensor, encode_tensor


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_tensor_wire_round_trip(dtype):
    a = (mx.random.normal((1, 3, 8)) * 3).astype(getattr(mx, dtype))
    data, shape, name = encode_tensor(a)
    assert name == dtype and shape == [1, 3, 8]
    b = decode_tensor(data, shape, name)
    assert b.dtype == a.dtype
    assert mx.array_equal(a, b).item()


def test_decode_rejects_inconsistent_tensors():
    with pytest.raises(BadFrame, match="got 10 bytes, expected 128"):
        decode_tensor(b"\x00" * 10, [1, 1, 32], "float32")
    with pytest.raises(BadFrame, match="unsupported tensor dtype"):
        decode_tensor(b"\x00" * 32, [1, 1, 32], "int8")
    with pytest.raises(BadFrame, match="NaN"):
        decode_tensor(np.full(32, np.inf, np.float32).tobytes(), [1, 1, 32], "float32")
    for dtype in ("float16", "bfloat16"):  # bfloat16 travels as its bits
        bad = mx.array([1.0, float("nan"), 2.0, 3.0], dtype=getattr(mx, dtype))[None, None]
        with pytest.raises(BadFrame, match="NaN"):
            decode_tensor(*encode_tensor(bad))


def test_synthetic_shard_makes_only_its_layers_and_they_match_the_whole_model():
    source = resolve("synthetic:tiny")
    shard = load_shard(source, 2, 4)
    whole = synthetic_full_model("synthetic:tiny")
    assert len(shard.layers) == 3 and not shard.is_first and not shard.is_last
    for mine, ref in zip(shard.layers, whole.model.layers[2:5]):
        for (name, a), (_, b) in zip(tree_flatten(mine.parameters()),
                                     tree_flatten(ref.parameters())):
            assert mx.array_equal(a, b).item(), name
    # a middle shard evaluates neither embedding nor head
    assert shard.weight_bytes == sum(p.nbytes for _, p in tree_flatten(
        [layer.parameters() for layer in shard.layers]))


def test_synthetic_layers_override_and_13b_shape_without_materialising():
    source = resolve("synthetic:llama-13b", layers=4)
    assert source.n_layers == 4 and source.config["hidden_size"] == 5120
    with pytest.raises(ModelError, match="unknown dtype"):
        resolve("synthetic:tiny", dtype="float8")
    with pytest.raises(ModelError, match="--layers only applies"):
        resolve("smollm2-135m", layers=3)
    with pytest.raises(ModelError, match="out of bounds"):
        load_shard(resolve("synthetic:tiny"), 3, 8)


def test_engine_checks_positions_and_frees_caches():
    shard = load_shard(resolve("synthetic:tiny"), 0, 7)
    engine = Engine(shard, ThreadPoolExecutor(1))

    async def run():
        ids = ByteTokenizer().encode("hi", chat=False)
        r = await engine.step("a", 0, tokens=ids, sample=Sampling())
        assert r.token is not None and r.hidden is None and r.compute_s > 0
        assert engine.cache_offset("a") == len(ids)
        with pytest.raises(FrameGap, match="cache holds 3 positions: frames were lost"):
            await engine.step("a", 7, tokens=[1], sample=Sampling())
        with pytest.raises(FrameGap, match="must start at 0"):
            await engine.step("b", 4, tokens=[1], sample=Sampling())
        with pytest.raises(BadFrame, match="out of range"):
            await engine.step("c", 0, tokens=[9999], sample=Sampling())
        assert engine.active_requests == 1
        assert engine.free("a") and engine.active_requests == 0
        await engine.step("d", 0, tokens=[1], sample=Sampling())
        assert engine.free_idle(0.0) == ["d"]

    asyncio.run(run())


def test_byte_tokenizer_streams_utf8():
    tok = ByteTokenizer()
    ids = tok.encode("héllo ✓", chat=False)
    assert ids[0] == ByteTokenizer.BOS
    detok = tok.detokenizer()
    out = ""
    for t in ids[1:]:
        detok.add_token(t)
        out += detok.last_segment
    detok.finalize()
    assert out + detok.last_segment == "héllo ✓"


@pytest.mark.parametrize("arch,start,end", [
    ("tiny", 0, 7), ("tiny", 0, 3), ("tiny", 4, 7),
    *((arch, 0, 7) for arch in TINY_ARCHS if arch != "llama"),
    ("gemma3_text", 2, 5), ("qwen3_moe", 3, 7), ("gemma2", 0, 4)])
def test_steps_of_different_requests_share_one_forward_and_match_one_at_a_time(arch, start,
                                                                                end):
    """Continuous batching, for every architecture: prefill chunks and decode steps of
    requests at different positions run in one batch (mlx-lm's batch caches, through the
    model's own code) and get what they get alone (tokens, or hidden states within float
    rounding of a batched matmul). Requests join (a late prefill beside the others' decode
    steps), step alone and rejoin, and leave (freed) between forwards. gemma3's prompts
    outrun its sliding window (rotating caches)."""
    source = resolve(f"synthetic:{arch}")
    shard = load_shard(source, start, end)
    prompts = [[256, *b"a"], [256, *b"longer prompt"], [256, *b"mid one"], [256],
               [256, *b"late joiner"]]
    late = len(prompts) - 1
    sizes: list[int] = []
    sample = Sampling() if shard.is_last else None

    def prefill(engine: Engine, i: int):
        p = prompts[i]
        first = ({"tokens": p} if shard.is_first else
                 {"hidden": encode_tensor(mx.random.normal((1, len(p), shard.hidden_size),
                                                           key=mx.random.key(i)))})
        return engine.step(f"r{i}", 0, **first, sample=sample)

    def decode(engine: Engine, i: int, n: int):
        if shard.is_first:
            step = {"tokens": [65 + n]}
        else:
            h = mx.random.normal((1, 1, shard.hidden_size), key=mx.random.key(1000 * i + n))
            step = {"hidden": encode_tensor(h)}
        return engine.step(f"r{i}", len(prompts[i]) + n, **step, sample=sample)

    def value(result):
        return result.token if shard.is_last else np.frombuffer(result.hidden[0], np.float32)

    # (request, step) pairs of each round, -1 for the prefill: the late request prefills
    # in round 3 and decodes after that;
    # r1 is freed after round 4; in round 5 r0 steps alone before the others
    rounds = [[(i, -1) for i in range(late)]]
    for n in range(7):
        rounds.append([(i, n) for i in range(late) if i != 1 or n < 4])
        if n >= 2:
            rounds[-1].insert(2, (late, n - 3))

    async def run(batched: bool) -> dict[tuple[int, int], object]:
        executor = ThreadPoolExecutor(1)
        engine = Engine(shard, executor, on_forward=lambda rows, group, seconds: sizes.append(rows))
        out: dict[tuple[int, int], object] = {}
        for n, steps in enumerate(rounds):
            before = len(sizes)
            if n == 5:  # r0 alone, then the rest
                out[steps[0]] = value(await decode(engine, *steps[0]))
                steps = steps[1:]
            if n == 6 and batched:  # a forward of prefills alone leaves the group as it is
                held = list(engine.batch.groups[0].ids)
                chunk = ({"tokens": [256, 7, 8, 9]} if shard.is_first else
                         {"hidden": encode_tensor(mx.ones((1, 4, shard.hidden_size)))})
                await asyncio.gather(*(engine.step(f"other{j}", 0, **chunk) for j in range(2)))
                assert sizes[-1] == 2 and engine.batch.groups[0].ids == held
            calls = [prefill(engine, i) if k < 0 else decode(engine, i, k) for i, k in steps]
            results = (await asyncio.gather(*calls) if batched else [await c for c in calls])
            out.update({key: value(r) for key, r in zip(steps, results)})
            forwards.append(sizes[before:])
            if n == 4:
                assert engine.free("r1")
        for i in range(len(prompts)):
            engine.free(f"r{i}")
        await asyncio.get_running_loop().run_in_executor(executor, lambda: None)
        assert not engine.batch.groups  # the freed rows left the group: caches released
        return out

    forwards: list[list[int]] = []  # the forward sizes of each round
    alone = asyncio.run(run(batched=False))
    assert set(sizes) == {1}
    forwards.clear()
    together = asyncio.run(run(batched=True))
    # steps queued together run as one forward: the prefills, then the late prefill with
    # the decode steps of the others
    assert forwards[0] == [late]
    assert forwards[3] == [len(prompts)]
    assert alone.keys() == together.keys()
    for key, a in alone.items():
        if shard.is_last:
            assert a == together[key], key
        else:
            np.testing.assert_allclose(a, together[key], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["tiny", "gemma3_text"])
def test_micro_batches_run_one_group_per_forward_and_give_the_tokens_of_one_batch(arch):
    """Steps of two micro-batches queued together run as two forwards, one group each; each
    group keeps its own decode group of batch caches, untouched by the other's forwards
    (gemma3's rotating caches past its sliding window too). A request that moves to the
    other group on its next step (as the first shard evens the groups) decodes on. Every
    token equals the one it gets with all requests in one group."""
    shard = load_shard(resolve(f"synthetic:{arch}"), 0, 7)
    prompts = {f"r{i}": [256, *(b"prompt %d " % i) * (i + 1)] for i in range(6)}
    steps_n = 6

    async def run(groups: int) -> tuple[dict[str, list[int]], list[set[int]]]:
        executor = ThreadPoolExecutor(1)
        engine = Engine(shard, executor)
        forwards: list[set[int]] = []
        run_batch = engine.batch.run
        engine.batch.run = lambda steps: (forwards.append({s.group for s in steps}),
                                          run_batch(steps))[1]
        group = {r: i % groups for i, r in enumerate(prompts)}
        out = {r: [(await engine.step(r, 0, tokens=p, sample=Sampling(), group=group[r])).token]
               for r, p in prompts.items()}
        for n in range(steps_n):
            if n == 3 and groups > 1:
                group["r0"] = 1  # moves: the next step copies its KV into group 1
            results = await asyncio.gather(*(
                engine.step(r, len(p) + n, tokens=[out[r][-1]], sample=Sampling(),
                            group=group[r]) for r, p in prompts.items()))
            for r, res in zip(prompts, results):
                out[r].append(res.token)
            if groups > 1:
                assert sorted(engine.batch.groups) == [0, 1]
                held = {g: set(grp.ids) for g, grp in engine.batch.groups.items()}
                assert held == {g: {r for r in prompts if group[r] == g} for g in (0, 1)}
        executor.shutdown()
        return out, forwards

    one, _ = asyncio.run(run(1))
    two, forwards = asyncio.run(run(2))
    assert two == one
    assert all(len(f) == 1 for f in forwards)  # never two groups in one forward
    assert {g for f in forwards for g in f} == {0, 1}


def test_a_step_whose_caller_went_away_does_not_bring_its_freed_request_back():
    """A client that disconnects while its prefill waits in the queue (here: for the burst
    admission) frees the request; the queued step must not create it again."""
    shard = load_shard(resolve("synthetic:tiny"), 0, 7)

    async def run() -> int:
        engine = Engine(shard, ThreadPoolExecutor(1), gather_s=0.25, admit_s=0.05)
        gone = asyncio.ensure_future(engine.step("gone", 0, tokens=[256, 1, 2]))
        await asyncio.sleep(0.01)  # queued, the admission window still open
        gone.cancel()
        engine.free("gone")
        await engine.step("b", 0, tokens=[256, 3, 4])
        return engine.active_requests

    assert asyncio.run(run()) == 1  # "b" alone


def test_a_malformed_step_fails_alone_and_the_batch_goes_on():
    """A frame with no positions is refused before the forward; the other requests'
    steps in the same forward run, and their decoding group stays usable."""
    shard = load_shard(resolve("synthetic:tiny"), 2, 5)
    hidden = shard.hidden_size

    def frame(n: int, key: int):
        return encode_tensor(mx.random.normal((1, n, hidden), key=mx.random.key(key)))

    async def run() -> None:
        engine = Engine(shard, ThreadPoolExecutor(1))
        await asyncio.gather(*(engine.step(r, 0, hidden=frame(3, i)) for i, r in
                               enumerate("ab")))
        await asyncio.gather(*(engine.step(r, 3, hidden=frame(1, 10 + i)) for i, r in
                               enumerate("ab")))
        results = await asyncio.gather(
            engine.step("a", 4, hidden=frame(1, 20)), engine.step("b", 4, hidden=frame(1, 21)),
            engine.step("z", 0, hidden=frame(0, 22)), return_exceptions=True)
        assert isinstance(results[2], BadFrame) and "positions" in str(results[2])
        assert all(not isinstance(r, BaseException) for r in results[:2])
        again = await asyncio.gather(*(engine.step(r, 5, hidden=frame(1, 30 + i)) for i, r in
                                       enumerate("ab")))
        assert all(r.hidden is not None for r in again)
        assert engine.cache_offset("a") == engine.cache_offset("b") == 6

    asyncio.run(run())


def test_a_much_longer_cache_decodes_beside_the_group_not_padding_it():
    """Decode rows share a BatchKVCache padded to the longest row; a request whose cache is
    far longer than the others' attends alone in the same forward, with the same tokens."""
    shard = load_shard(resolve("synthetic:tiny"), 0, 7)
    prompts = {"long": [256, *(i % 250 + 1 for i in range(1000))], "s1": [256, 1],
               "s2": [256, 2], "s3": [256, 3]}

    async def run(batched: bool):
        engine = Engine(shard, ThreadPoolExecutor(1))
        out: dict[str, list[int]] = {name: [] for name in prompts}
        for name, p in prompts.items():
            await engine.step(name, 0, tokens=p, sample=Sampling())
        for n in range(4):
            steps = [engine.step(name, len(p) + n, tokens=[65 + n], sample=Sampling())
                     for name, p in prompts.items()]
            results = await asyncio.gather(*steps) if batched else [await c for c in steps]
            for name, r in zip(prompts, results):
                out[name].append(r.token)
        return out, (engine.batch.groups[0].ids if engine.batch.groups else [])

    alone, _ = asyncio.run(run(batched=False))
    together, grouped = asyncio.run(run(batched=True))
    assert together == alone
    assert sorted(grouped) == ["s1", "s2", "s3"]  # "long" attended alone


def test_seeded_sampling_repeats_whether_or_not_the_request_shares_forwards():
    """Each sampled request draws from its own random key: a seeded request gets the same
    tokens alone as in a batch beside other sampled requests."""
    shard = load_shard(resolve("synthetic:tiny"), 0, 7)
    seeds = {"a": 7, "b": 11, "c": 7}

    async def run(names: list[str]) -> dict[str, list[int]]:
        engine = Engine(shard, ThreadPoolExecutor(1))
        out: dict[str, list[int]] = {n: [] for n in names}
        for n in range(6):
            steps = [engine.step(name, 0 if n == 0 else 4 + n, tokens=[256, 1, 2, 3, 4] if
                                 n == 0 else [65 + n], sample=Sampling(0.9, 0.95, seeds[name]))
                     for name in names]
            for name, result in zip(names, await asyncio.gather(*steps)):
                out[name].append(result.token)
        return out

    alone = asyncio.run(run(["a"]))["a"]
    together = asyncio.run(run(["a", "b", "c"]))
    assert together["a"] == alone
    assert together["c"] == alone  # same seed, same prompt: same draws
    assert together["b"] != alone


def test_log_probabilities_are_normalised_per_row_of_a_batch():
    """Samplers (top-p) read exp(logprobs) as each request's own distribution."""
    from node.sampling import row_logprobs

    shard = load_shard(resolve("synthetic:tiny"), 0, 7)
    tokens = mx.array([[256, 72], [256, 73], [256, 74]])
    logits = shard.runner.forward(tokens, shard.runner.make_cache())[:, -1]
    sums = mx.exp(row_logprobs(logits)).sum(axis=-1)
    assert np.allclose(np.array(sums), 1.0, atol=1e-4)


def test_a_shard_needs_only_the_weight_files_of_its_layers(tmp_path):
    """The weight index tells which files hold a layer range (what a node downloads)."""
    import json

    from node.hub import layer_files

    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "model.embed_tokens.weight": "a.safetensors",
        "model.layers.0.mlp.up_proj.weight": "a.safetensors",
        "model.layers.1.mlp.up_proj.weight": "b.safetensors",
        "model.layers.2.mlp.up_proj.weight": "b.safetensors",
        "model.layers.3.mlp.up_proj.weight": "c.safetensors",
        "model.norm.weight": "c.safetensors", "lm_head.weight": "d.safetensors"}}))
    names = [[f.name for f in layer_files(tmp_path, a, b, 4)] for a, b in
             [(0, 0), (1, 2), (2, 3), (0, 3)]]
    assert names == [["a.safetensors"], ["b.safetensors"],
                     ["b.safetensors", "c.safetensors", "d.safetensors"],
                     ["a.safetensors", "b.safetensors", "c.safetensors", "d.safetensors"]]
    assert layer_files(tmp_path / "nowhere", 0, 1, 2) is None


@pytest.mark.parametrize("start,end,dtype", [(0, 3, ""), (4, 7, ""), (2, 5, "bfloat16"),
                                             (0, 7, "float16")])
def test_warm_up_runs_each_batch_size_and_leaves_nothing_behind(start, end, dtype):
    """The warm-up (node/warmup.py, run at load on a GPU) goes through the requests' own
    code for each batch size (first, middle and last shards, each wire dtype) and leaves no request,
    decode group, cached prompt or ring pace behind: a request served after it gets what it
    gets on a shard never warmed."""
    from node.batch import ShardBatch, Step
    from node.warmup import warm

    source = resolve("synthetic:tiny", dtype=dtype) if dtype else resolve("synthetic:tiny")
    shard = load_shard(source, start, end)
    warmed, cold = ShardBatch(shard, prompt_cache_bytes=1 << 20), ShardBatch(shard)
    sizes = [1, 2, 3, 5]
    done, seconds = warm(warmed, sizes)
    assert done == sizes and seconds > 0
    assert warmed.requests == {} and not warmed.groups and warmed.cycle == 0.0
    assert warmed.prompts.info().entries == 0
    sample = Sampling() if shard.is_last else None
    h = mx.random.normal((1, 4, shard.hidden_size), key=mx.random.key(3)).astype(
        getattr(mx, shard.dtype))
    step = ({"tokens": [256, 7, 8, 9]} if shard.is_first else {"hidden": encode_tensor(h)})
    a, b = (batch.run([Step("r", 0, sample=sample, **step)])[0] for batch in (warmed, cold))
    assert a.token == b.token and a.hidden == b.hidden


def test_warm_up_batch_sizes_parse_as_the_flag_takes_them():
    from node.warmup import parse_batch_sizes

    assert parse_batch_sizes("auto") is None
    assert parse_batch_sizes("none") == [] and parse_batch_sizes("0") == []
    assert parse_batch_sizes("1-4,16, 8") == [1, 2, 3, 4, 8, 16]
    for bad in ("x", "4-2", "0-3", "2000"):
        with pytest.raises(ValueError):
            parse_batch_sizes(bad)


def test_a_request_that_ends_is_no_longer_waited_for():
    """A shard waits (its gather window) for the next steps of the requests under way, so
    that they share a forward. When one of them ends meanwhile, the others go at once
    instead of waiting out the window for a step that will never come (a 30 s window
    here: the step would time out)."""
    shard = load_shard(resolve("synthetic:tiny"), 0, 7)

    async def run(executor: ThreadPoolExecutor) -> None:
        engine = Engine(shard, executor, gather_s=30.0)
        greedy = Sampling()
        await asyncio.gather(*(engine.step(f"r{i}", 0, tokens=[256, 65 + i], sample=greedy)
                               for i in range(2)))
        await asyncio.gather(*(engine.step(f"r{i}", 2, tokens=[70], sample=greedy)
                               for i in range(2)))
        alone = asyncio.ensure_future(engine.step("r0", 3, tokens=[71], sample=greedy))
        await asyncio.sleep(0.2)
        assert not alone.done()  # waiting for r1's step
        assert engine.free("r1")
        result = await asyncio.wait_for(alone, 5.0)
        assert result.token is not None

    with ThreadPoolExecutor(1) as executor:
        asyncio.run(run(executor))


def test_a_prompt_chunk_runs_while_the_decode_steps_are_away_not_in_their_forward():
    """While a group's window waits for its decode steps to come back round the ring, a
    long prompt's chunk runs alone (the bubble); the decode steps then go without the
    request's next chunk, which waits for the next bubble: one chunk per round of the
    group. Chunks are sized under the per-forward token budget of the rows in flight."""
    shard = load_shard(resolve("synthetic:tiny"), 0, 7)
    sizes: list[int] = []

    async def run(executor: ThreadPoolExecutor) -> None:
        engine = Engine(shard, executor, gather_s=30.0, tuning=Tuning(gather_recent_s=600.0),
                        on_forward=lambda rows, group, seconds: sizes.append(rows))
        greedy = Sampling()
        assert engine.chunk_tokens("long") == 0  # nothing else under way: no limit
        await asyncio.gather(*(engine.step(f"r{i}", 0, tokens=[256, 65 + i], sample=greedy)
                               for i in range(2)))
        await engine.step("long", 0, tokens=[256, *range(70, 80)])
        t = engine.tuning
        assert engine.chunk_tokens("long") == max(t.busy_tokens, 2 * t.busy_per_row) - 2
        sizes.clear()
        r0 = asyncio.ensure_future(engine.step("r0", 2, tokens=[70], sample=greedy))
        chunk = await asyncio.wait_for(engine.step("long", 11, tokens=[81, 82, 83]), 10.0)
        assert chunk.token is None and not r0.done(), sizes  # r0 still waits for r1
        nxt = asyncio.ensure_future(engine.step("long", 14, tokens=[84, 85]))
        await asyncio.wait_for(asyncio.gather(
            r0, engine.step("r1", 2, tokens=[71], sample=greedy), nxt), 10.0)
        assert sizes == [1, 2, 1]  # the chunk, the decode steps, the next chunk

    with ThreadPoolExecutor(1) as executor:
        asyncio.run(run(executor))
