"""Benchmark: the best a 3-process loopback pipeline can do on this machine.

`pipeline_overhead.py` compares the real nodes (gRPC control plane, asyncio, the data
port, the engine's scheduling) with one mlx_lm process. This script takes all of that
away to find the floor under it: three bare processes, each running one uniform shard
with the nodes' own shard code (node/batch.py `ShardBatch`, the same as
`idle_penalty.py`), connected in a ring by plain blocking TCP sockets on loopback. The
first process feeds the token, each passes its hidden state on with one `sendall`, the
last sends the sampled token back. No event loop, no threads of ours, no protobuf.

It prints, interleaved in one run:
- `single`: mlx_lm decode in one fresh process (tests/bench/common.py), the reference
  `pipeline_overhead.py` uses;
- `inline`: the three shards back to back in one process (the nodes' code, no hops);
- `bare-block`: the three-process ring, each process blocked in `recv` between tokens;
- `bare-spin` (only with `--sides`): the same ring, each process polling its socket
  instead of blocking (keeps its core awake; on a 2-core machine it also takes cycles
  from the shard that computes);
and for each ring its hop p50 (sender's clock before `sendall` to receiver's after
`recv`, one host) and each shard's forward p50.

If `bare-block / single` is already below 0.95 here, the machine, not the node stack,
sets the ceiling for `pipeline_overhead.py`'s ratio.

    .venv/bin/python tests/bench/pipeline_floor.py [--model smollm2-135m] [--tokens 128]
    .venv/bin/python tests/bench/pipeline_floor.py --sides bare-block,bare-spin
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import socket
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from node.blas import openblas_env, reexec_with_openblas  # noqa: E402
from tests.bench.common import add_model_arguments, prompt_ids, single_process  # noqa: E402

LENGTH = struct.Struct("!I")


def send(sock: socket.socket, obj: object) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    sock.sendall(LENGTH.pack(len(data)) + data)


def recv(sock: socket.socket, spin: bool) -> object:
    def exactly(n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            try:
                chunk = sock.recv(n - len(out))
            except BlockingIOError:
                continue  # spinning: nothing yet
            if not chunk:
                raise EOFError("peer closed")
            out += chunk
        return bytes(out)

    return pickle.loads(exactly(LENGTH.unpack(exactly(LENGTH.size))[0]))


def shards_of(model: str, dtype: str, layers: int) -> list[tuple[int, int]]:
    from node.models import resolve

    n = resolve(model, dtype, layers).n_layers
    cuts = [0, n // 3, 2 * n // 3, n]
    return [(a, b - 1) for a, b in zip(cuts, cuts[1:])]


# ------------------------------------------------------------------ one ring process


def worker(args: argparse.Namespace) -> int:
    """Rank k of the ring: listen for the previous rank, connect to the next."""
    reexec_with_openblas()
    from node.batch import ShardBatch, Step
    from node.models import load_shard, resolve
    from node.sampling import Sampling

    source = resolve(args.model, args.dtype, args.layers)
    start, end = shards_of(args.model, args.dtype, args.layers)[args.rank]
    batch = ShardBatch(load_shard(source, start, end))
    first, last = args.rank == 0, args.rank == 2
    inbound = socket.create_server(("127.0.0.1", args.port))
    print(f"ready {args.rank}", flush=True)
    for _ in range(600):  # the next rank may still be loading its shard
        try:
            out = socket.create_connection(("127.0.0.1", args.next_port))
            break
        except ConnectionRefusedError:
            time.sleep(0.1)
    else:
        sys.exit(f"rank {args.rank}: the next rank never listened")
    out.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn, _ = inbound.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn.setblocking(not args.spin)
    ids = prompt_ids(args.model, args.layers)
    forwards: list[float] = []
    hops: list[float] = []

    def run(step: Step):
        t0 = time.perf_counter()
        result = batch.run([step])[0]
        if isinstance(result, Exception):
            raise result
        forwards.append(time.perf_counter() - t0)
        return result

    def take() -> tuple:
        message = recv(conn, args.spin)
        hops.append(time.time_ns() - message[-1])
        return message

    for repeat in range(args.repeats + 1):  # the first is a warm-up
        rid = f"r{repeat}"
        forwards.clear()
        hops.clear()
        t_start = 0.0
        for i in range(args.tokens + 1):
            if first:
                if i == 0:
                    step = Step(rid, 0, tokens=ids)
                else:
                    token, _ = take()
                    if i == 1:
                        t_start = time.perf_counter()
                    step = Step(rid, len(ids) + i - 1, tokens=[token])
                send(out, (step.position, run(step).hidden, time.time_ns()))
            else:
                position, hidden, _ = take()
                step = Step(rid, position, hidden=hidden, sample=Sampling() if last else None)
                result = run(step)
                if last:
                    send(out, (result.token, time.time_ns()))
                else:
                    send(out, (position, result.hidden, time.time_ns()))
        if first:
            token, _ = take()  # the last token of this repeat
            seconds = time.perf_counter() - t_start
        batch.lost([rid])
        summary = {"rank": args.rank,
                   "forward_p50_s": statistics.median(forwards[1:]),
                   "hop_p50_s": statistics.median(hops[1:]) / 1e9 if len(hops) > 1 else 0.0}
        if first:
            summary["tokens_per_s"] = args.tokens / seconds
        if repeat:
            print("result " + json.dumps(summary), flush=True)
        # all ranks end the repeat together: the first waits for the last token above
    return 0


def ring(args: argparse.Namespace, spin: bool) -> list[dict]:
    """Start the three ranks for `args.repeats` timed repeats; their summaries."""
    ports = []
    for _ in range(3):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    procs = []
    try:
        for rank in range(3):
            cmd = [sys.executable, __file__, "--worker", "--rank", str(rank), "--port",
                   str(ports[rank]), "--next-port", str(ports[(rank + 1) % 3]), "--model",
                   args.model, "--layers", str(args.layers), "--dtype", args.dtype,
                   "--tokens", str(args.tokens), "--repeats", str(args.repeats)]
            procs.append(subprocess.Popen(cmd + (["--spin"] if spin else []),
                                          stdout=subprocess.PIPE, text=True,
                                          env=openblas_env(), cwd=ROOT))
        for rank, proc in enumerate(procs):
            if not proc.stdout.readline().startswith("ready"):  # listening
                sys.exit(f"rank {rank} did not start")
        results = []
        for proc in procs:
            out, _ = proc.communicate(timeout=600)
            results += [json.loads(line[7:]) for line in out.splitlines()
                        if line.startswith("result ")]
            if proc.returncode:
                sys.exit(f"a ring rank failed ({proc.returncode})")
        return results
    finally:  # a rank that failed leaves the others blocked in recv: they go too
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def bare_ring(model: str, layers: int, dtype: str, tokens: int) -> dict:
    """One timed run of the blocking ring: tokens_per_s, hop_p50_s (all ranks' hops) and
    forward_p50_s (per rank)."""
    args = argparse.Namespace(model=model, layers=layers, dtype=dtype, tokens=tokens,
                              repeats=1)
    results = sorted(ring(args, spin=False), key=lambda r: r["rank"])
    return {"tokens_per_s": results[0]["tokens_per_s"],
            "hop_p50_s": statistics.median(r["hop_p50_s"] for r in results),
            "forward_p50_s": [r["forward_p50_s"] for r in results]}


def inline(args: argparse.Namespace) -> float:
    """The three shards back to back in one fresh process: decode tokens/s."""
    cmd = [sys.executable, __file__, "--inline", "--model", args.model, "--layers",
           str(args.layers), "--dtype", args.dtype, "--tokens", str(args.tokens)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=openblas_env(), cwd=ROOT,
                         timeout=600)
    if res.returncode:
        sys.exit(f"inline run failed:\n{res.stderr}")
    return float(res.stdout.split()[-1])


def inline_worker(args: argparse.Namespace) -> int:
    reexec_with_openblas()
    from node.batch import ShardBatch, Step
    from node.models import load_shard, resolve
    from node.sampling import Sampling

    source = resolve(args.model, args.dtype, args.layers)
    batches = [ShardBatch(load_shard(source, a, b))
               for a, b in shards_of(args.model, args.dtype, args.layers)]
    ids = prompt_ids(args.model, args.layers)

    def token(inputs: list[int], position: int, rid: str) -> int:
        out = None
        for k, batch in enumerate(batches):
            step = (Step(rid, position, tokens=inputs) if k == 0 else
                    Step(rid, position, hidden=out.hidden))
            step.sample = Sampling() if k == 2 else None
            out = batch.run([step])[0]
        return out.token

    for rid in ("warm", "timed"):
        next_id = token(ids, 0, rid)
        t0 = time.perf_counter()
        for i in range(args.tokens):
            next_id = token([next_id], len(ids) + i, rid)
        seconds = time.perf_counter() - t0
        for batch in batches:
            batch.lost([rid])
    print(f"{args.tokens / seconds:.4f}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed repeats of each side (interleaved)")
    parser.add_argument("--sides", default="single,inline,bare-block",
                        help="which of single,inline,bare-block,bare-spin to run")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--inline", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--next-port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--spin", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.inline:
        return inline_worker(args)

    ids = prompt_ids(args.model, args.layers)
    print(f"model {args.model}, shards {shards_of(args.model, args.dtype, args.layers)}, "
          f"prompt {len(ids)} tokens, {args.tokens} tokens, {args.repeats} repeats, "
          f"{os.cpu_count()} CPUs", flush=True)
    sides = args.sides.split(",")
    unknown = set(sides) - {"single", "inline", "bare-block", "bare-spin"}
    if unknown or not sides:
        parser.error(f"unknown side(s) {', '.join(sorted(unknown))}")
    rows: dict[str, list[float]] = {name: [] for name in sides}
    detail: dict[str, list[dict]] = {name: [] for name in sides if name.startswith("bare")}
    for i in range(args.repeats):
        for name in sides:
            if name == "single":
                rows[name].append(single_process(args.model, ids, args.tokens, args.layers,
                                                 args.dtype)["decode_tokens_per_s"])
            elif name == "inline":
                rows[name].append(inline(args))
            else:
                results = ring(argparse.Namespace(**{**vars(args), "repeats": 1}),
                               spin=name == "bare-spin")
                detail[name] += results
                rows[name].append(next(r["tokens_per_s"] for r in results
                                       if "tokens_per_s" in r))
        print(f"  round {i + 1}/{args.repeats}: "
              + ", ".join(f"{k} {v[-1]:.2f}" for k, v in rows.items()), flush=True)
    base = rows[sides[0]]  # the first side is the one the others are divided by
    single = statistics.median(base)
    print(f"{'side':<11} {'tok/s':>7} {'/ ' + sides[0]:>9} {'paired':>7}   hop p50    "
          "forward p50 per shard")
    for name, values in rows.items():
        paired = statistics.median(b / a for a, b in zip(base, values))
        extra = ""
        if name in detail:
            hop = statistics.median(r["hop_p50_s"] for r in detail[name]) * 1e3
            fwd = [statistics.median(r["forward_p50_s"] for r in detail[name]
                                     if r["rank"] == k) * 1e3 for k in range(3)]
            extra = f"   {hop:.3f} ms   " + " + ".join(f"{f:.1f}" for f in fwd) + " ms"
        print(f"{name:<11} {statistics.median(values):7.2f} "
              f"{statistics.median(values) / single:9.3f} {paired:7.3f}{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
