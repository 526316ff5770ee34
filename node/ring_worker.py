"""One rank of an mx.distributed ring group, started and watched by a node service.

The node service (node/ring.py) starts this process with the group in the environment
(`MLX_HOSTFILE`, `MLX_RANK`, as `mlx.launch` would set them) and the model in argv[1]
(JSON). It forms the group with MLX's `ring` backend, loads its part of the model and
serves requests. Rank 0's node service writes requests to rank 0's stdin; rank 0 shares
each one with the other ranks over the group itself (an all_sum to which the others
add zeros, as `mlx_lm.server` shares prompts), so every rank runs the same steps.

- `tensor`: every rank holds every layer, split by mlx-lm's `model.shard(group)`;
  mlx-lm's `generate_step` runs on every rank in lockstep (same seed, same tokens).
- `pipeline`: rank r holds a contiguous layer range; hidden states go r -> r+1 with
  `mx.distributed.send/recv` and the last rank sends each sampled token to rank 0, its
  ring neighbour.

Failure is MLX's: when a rank dies, the others' next collective fails ("connection to
a peer was lost") and they exit; the node services see the exit and report the group
down. The worker also exits when its node service goes away.

Protocol (JSON lines): stdin of rank 0 takes {"op": "gen", ...} and {"op": "cancel",
"id": ...}; stdout carries events {"ev": ...} from every rank. Anything MLX or Python
prints goes to stderr, which the node service logs.
"""

from __future__ import annotations

import json
import os
import queue
import sys
import threading
import time
from typing import Any, TextIO

from node.wire import DTYPES

EXIT_GROUP_LOST = 3
EXIT_PARENT_GONE = 4
EXIT_MODEL_FAILED = 5


class Events:
    """The protocol stream to the node service: fd 1 as it was at start. fd 1 itself is
    pointed at stderr, so nothing else can write into the protocol."""

    def __init__(self) -> None:
        self._out: TextIO = os.fdopen(os.dup(1), "w", buffering=1)
        os.dup2(2, 1)
        sys.stdout = sys.stderr
        self._lock = threading.Lock()

    def __call__(self, ev: str, **fields: Any) -> None:
        with self._lock:
            self._out.write(json.dumps({"ev": ev, **fields}) + "\n")


def watch_parent(parent: int) -> None:
    """Exit when the node service that started us is gone (killed or crashed): a rank
    must not outlive the service that reports it."""
    def run() -> None:
        while True:
            time.sleep(0.2)
            if os.getppid() != parent:
                os._exit(EXIT_PARENT_GONE)

    threading.Thread(target=run, daemon=True, name="parent-watch").start()


def read_requests(requests: queue.Queue, cancelled: set[str]) -> None:
    """Requests (rank 0) or wake-ups (other ranks) from the node service's stdin; EOF means
    the service is gone."""
    for line in sys.stdin:
        try:
            message = json.loads(line)
        except ValueError:
            continue
        if message.get("op") == "cancel":
            cancelled.add(str(message.get("id")))
        else:
            requests.put(message)
    requests.put({"op": "stop"})


def share(group: Any, message: dict | None) -> dict:
    """Rank 0's message, on every rank: its length, then its bytes, by all_sum."""
    import mlx.core as mx
    import numpy as np

    data = json.dumps(message).encode() if message is not None else b""
    n = int(mx.distributed.all_sum(mx.array([len(data)], dtype=mx.int32), group=group).item())
    local = (np.frombuffer(data, dtype=np.uint8).astype(np.int32) if data
             else np.zeros(n, dtype=np.int32))
    total = mx.distributed.all_sum(mx.array(local), group=group)
    return json.loads(bytes(np.array(total).astype(np.uint8)))


def agree(group: Any, mine: bool) -> bool:
    """True on every rank when rank 0 says so (rank 0's vote only)."""
    import mlx.core as mx

    vote = 1 if (mine and group.rank() == 0) else 0
    return bool(mx.distributed.all_sum(mx.array([vote], dtype=mx.int32), group=group).item())


def load(cfg: dict, group: Any):
    from node.models import load_shard, load_tensor_shard, resolve

    source = resolve(cfg["model"], cfg.get("dtype", ""), cfg.get("layers", 0))
    if cfg["parallel"] == "tensor":
        return load_tensor_shard(source, group)
    return load_shard(source, cfg["start"], cfg["end"])


def request_sampler(req: dict) -> Any:
    """The request's sampler, drawing the token at each position from a key made from the
    seed and that position as every backend does (node/sampling.py), so a seeded request
    gives the same tokens on each, resumed or not."""
    from node.sampling import RequestSampler, Sampling

    return RequestSampler(Sampling(req["temp"], req["top_p"], req["seed"]),
                          position=len(req["tokens"]))


def generate_tensor(shard: Any, group: Any, req: dict, emit: Events,
                    cancelled: set[str]) -> None:
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    # the same seed on every rank, so every rank samples alike
    sampler = request_sampler(req)
    rank0 = group.rank() == 0
    eos = set(req["eos"])
    t_prev = time.perf_counter()
    steps = generate_step(mx.array(req["tokens"]), shard.model, max_tokens=req["max"],
                          sampler=sampler)
    for n, (token, logprobs) in enumerate(steps, start=1):
        now = time.perf_counter()
        stop = n >= req["max"] or (token in eos and not req["ignore_eos"])
        if rank0:
            emit("tok", id=req["id"], tok=int(token), lp=float(logprobs[token].item()),
                 c=now - t_prev)
            stop = stop or req["id"] in cancelled
        else:
            emit("step", c=now - t_prev)
        t_prev = now
        if agree(group, stop):  # rank 0 decides: a cancel stops every rank at once
            break


def generate_pipeline(shard: Any, group: Any, req: dict, emit: Events,
                      cancelled: set[str]) -> None:
    import mlx.core as mx

    from node.sampling import row_logprobs

    rank, size = group.rank(), group.size()
    first, last = rank == 0, rank == size - 1
    runner = shard.runner  # the model's own forward over this rank's layers
    caches = runner.make_cache()

    def forward(x: Any, length: int) -> Any:
        pick = mx.array([length - 1]) if last else None
        return runner.forward(x, caches, pick=pick)

    eos = set(req["eos"])
    if last:
        sampler = request_sampler(req)
    tokens, n = list(req["tokens"]), 0
    while True:
        t0 = time.perf_counter()
        if first:
            if n and (n >= req["max"] or (tokens[0] in eos and not req["ignore_eos"])
                      or req["id"] in cancelled):
                if size > 1:  # tell the chain to stop
                    mx.eval(mx.distributed.send(mx.array([0.0, 0, 0, 0]), 1, group=group))
                return
            length, compute = len(tokens), 0.0
            h = forward(mx.array(tokens, dtype=mx.int32)[None], length)
        else:
            ctl = mx.distributed.recv((4,), mx.float32, rank - 1, group=group)
            go, length, compute, code = (float(v) for v in ctl.tolist())
            if not go:
                if not last:
                    mx.eval(mx.distributed.send(ctl, rank + 1, group=group))
                return
            dtype = getattr(mx, DTYPES[int(code)])
            t0 = time.perf_counter()  # waiting for the upstream rank is not compute
            h = mx.distributed.recv((1, int(length), shard.hidden_size), dtype, rank - 1,
                                    group=group)
            h = forward(h, int(length))
        if last:
            logprobs = row_logprobs(h[:, 0])  # h: the logits at the last position
            token = sampler(logprobs)
            mx.eval(token, logprobs)
            tok = int(token.item())
            lp = float(logprobs[0, tok].item())
            compute += time.perf_counter() - t0
            if not first:
                emit("step", c=time.perf_counter() - t0)
                mx.eval(mx.distributed.send(mx.array([float(tok), lp, compute]), 0,
                                            group=group))
                continue
        else:
            mx.eval(h)
            compute += time.perf_counter() - t0
            code = DTYPES.index(str(h.dtype).removeprefix("mlx.core."))
            mx.eval(mx.distributed.send(mx.array([1.0, length, compute, code]), rank + 1,
                                        group=group))
            mx.eval(mx.distributed.send(h, rank + 1, group=group))
            if not first:
                emit("step", c=time.perf_counter() - t0)
                continue
            back = mx.distributed.recv((3,), mx.float32, size - 1, group=group)
            tok_f, lp, compute = (float(v) for v in back.tolist())
            tok = int(tok_f)
        emit("tok", id=req["id"], tok=tok, lp=lp, c=compute)
        tokens, n = [tok], n + 1


def main(argv: list[str]) -> int:
    cfg = json.loads(argv[0])
    emit = Events()
    watch_parent(os.getppid())
    t0 = time.perf_counter()
    import mlx.core as mx
    from mlx_lm.generate import generation_stream

    # every op on one stream: mlx-lm's generate_step computes on generation_stream, and
    # collectives on two streams could interleave on the wire
    with mx.stream(generation_stream):
        return serve(cfg, emit, t0)


def serve(cfg: dict, emit: Events, t0: float) -> int:
    import mlx.core as mx

    try:
        group = mx.distributed.init(backend="ring", strict=True)
    except RuntimeError as e:
        emit("error", msg=f"cannot form the ring group: {e}")
        return EXIT_GROUP_LOST
    emit("formed", rank=group.rank(), size=group.size(), seconds=time.perf_counter() - t0)
    try:
        shard = load(cfg, group)
    except Exception as e:  # a model error: say so; the service reports it
        emit("error", msg=f"{type(e).__name__}: {e}")
        return 2
    try:  # every rank has loaded before any says it is ready (no wake reaches a loader)
        mx.eval(mx.distributed.all_sum(mx.array([1], dtype=mx.int32), group=group))
    except RuntimeError as e:
        emit("error", msg=f"the ring group is down: {e}")
        return EXIT_GROUP_LOST
    emit("ready", weight_bytes=shard.weight_bytes, dtype=shard.dtype,
         load_seconds=shard.load_seconds, active=mx.get_active_memory())
    requests: queue.Queue = queue.Queue()
    cancelled: set[str] = set()
    threading.Thread(target=read_requests, args=(requests, cancelled), daemon=True,
                     name="requests").start()
    run = generate_tensor if cfg["parallel"] == "tensor" else generate_pipeline
    while True:
        # MLX's ring collectives poll the sockets (a core each), so an idle rank waits here,
        # on its node service: rank 0's for the next request, the others' for a wake-up
        # that rank 0's node sends before each request (RingWake)
        message = requests.get()
        if message.get("op") == "stop":
            emit("stopped")
            return 0
        if group.rank() == 0 and message.get("id") in cancelled:
            cancelled.discard(message["id"])  # its client left while it waited: skip it
            message = {"op": "skip", "id": message["id"]}
        try:
            req = share(group, message if group.rank() == 0 else None)
            if req.get("op") == "skip":
                emit("end", id=req["id"], active=mx.get_active_memory(),
                     peak=mx.get_peak_memory())
                continue
            emit("start", id=req["id"])
            run(shard, group, req, emit, cancelled)
            cancelled.discard(req["id"])
            emit("end", id=req["id"], active=mx.get_active_memory(),
                 peak=mx.get_peak_memory())
            mx.clear_cache()
        except RuntimeError as e:  # MLX's ring: a peer went away; the group is gone
            emit("error", msg=f"the ring group is down: {e}")
            return EXIT_GROUP_LOST
        except Exception as e:  # the model's own code: the other ranks wait in lockstep
            # for this one, so the group cannot go on; say what failed, not "group down"
            emit("error", msg=f"{cfg['model']}: the model's code failed on rank "
                              f"{group.rank()} ({type(e).__name__}: {e}); reload the model, "
                              "or use --backend pipeline")
            return EXIT_MODEL_FAILED


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
