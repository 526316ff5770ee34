"""Cluster operations as a library: connect to nodes, find the entry node, plan and load a
model, generate, re-plan, pick nodes by name.

The command line (console/cli.py), the dashboard, the standalone HTTP gateway's model
loading and the benchmark call these; none of them keeps connection settings in a module:
a `Connection` is passed to whatever opens clients. A streamed request survives the loss
of its entry node (`stream`, over node.resume).
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from console.client import ClusterError, NodeClient, describe_rpc_error, gather_infos
from node import PROTOCOL_VERSION
from node.errors import ModelError
from node.membership import REJOIN_SETTLE_S
from node.models import SYNTHETIC_PREFIX, ModelSource, resolve
from node.placement import (
    MAX_MICROBATCHES,
    check_versions,
    next_epoch,
    node_specs,
    place,
    to_proto,
)
from node.plan import (
    DEFAULT_STRATEGY,
    PartitionPlan,
    PlanError,
    backend_label,
    layer_bar,
    stage_seconds,
)
from node.resume import NoEntry, Pending, entry_of, resumable
from protos import cluster_pb2 as pb


@dataclass(frozen=True)
class Connection:
    """How to reach the nodes: the cluster token (None: env MLX_CLUSTER_TOKEN) and the CA
    certificate that turns on TLS (None: plaintext)."""

    token: str | None = None
    tls_ca: Path | None = None

    def options(self) -> dict:
        """NodeClient keyword arguments (what the monitor and discovery take)."""
        return {k: v for k, v in (("token", self.token), ("tls_ca", self.tls_ca))
                if v is not None}

    def client(self, address: str, timeout_s: float = 10.0) -> NodeClient:
        return NodeClient(address, timeout_s, self.token, self.tls_ca)


@asynccontextmanager
async def connect(addresses: list[str],
                  connection: Connection | None = None) -> AsyncIterator[list[NodeClient]]:
    """One client per address, in order; their channels are closed on the way out."""
    connection = connection or Connection()
    clients = [connection.client(a) for a in addresses]
    try:
        yield clients
    finally:
        await asyncio.gather(*(c.close() for c in clients))


async def live_infos(clients: list[NodeClient]) -> list[pb.NodeInfo]:
    """Every node's GetInfo; a ClusterError naming each node that did not answer."""
    infos = await gather_infos(clients)
    errors = [str(i) for i in infos if isinstance(i, ClusterError)]
    if errors:
        raise ClusterError("; ".join(errors))
    return infos  # type: ignore[return-value]


# ---------------------------------------------------------------- the entry node


class NoNodeUp(ClusterError):
    """Not one of the nodes answered GetInfo."""


class EntryPending(ClusterError, Pending):
    """No entry node now, but a plan is on its way (a load, or the survivors' re-plan
    after a loss): a request waits for it (node.resume.resumable)."""


def entry_node(infos: list[pb.NodeInfo]) -> pb.NodeInfo:
    """The node holding the first shard of the newest loaded plan: layer 0 of a pipeline,
    rank 0 of an mlx-ring group. Generate requests go there (node.resume's one rule).
    EntryPending while a plan is on its way."""
    try:
        return entry_of(infos)
    except Pending as e:
        raise EntryPending(str(e)) from None
    except NoEntry as e:
        raise ClusterError(str(e)) from None


async def entry_client(clients: list[NodeClient]) -> tuple[NodeClient, pb.NodeInfo]:
    """The entry node's client and info, asking every node now. Nodes that are down are
    left out (after a recovery the plan no longer needs them); NoNodeUp when none answer."""
    infos = await gather_infos(clients)
    up = [(c, i) for c, i in zip(clients, infos) if not isinstance(i, ClusterError)]
    if not up:
        raise NoNodeUp("; ".join(str(i) for i in infos) or "no node is up")
    info = entry_node([i for _, i in up])
    return next(c for c, i in up if i.node_id == info.node_id), info


# ---------------------------------------------------------------- planning and loading


def resolve_model(model: str, dtype: str, layers: int) -> ModelSource:
    """The model's source (config, form, dtype) as the nodes will see it."""
    try:
        return resolve(model, dtype, layers)
    except ModelError as e:
        raise ClusterError(str(e)) from e
    except (OSError, ValueError, KeyError) as e:  # unreadable or incomplete model files
        raise ClusterError(f"cannot read model {model!r}: {e}") from e


def partition(infos: list[pb.NodeInfo], model: str, dtype: str, layers: int, strategy: str,
              backend: str = "pipeline") -> tuple[PartitionPlan, ModelSource]:
    """Plan `model` over the nodes (in their order): a checked PartitionPlan and the source.
    Every node must speak this console's protocol version."""
    try:
        check_versions(infos, PROTOCOL_VERSION)
    except PlanError as e:
        raise ClusterError(str(e)) from e
    source = resolve_model(model, dtype, layers)
    try:
        return place(source, node_specs(infos), strategy, backend, model), source
    except (PlanError, ModelError) as e:
        raise ClusterError(str(e)) from e


def proto_plan(plan: PartitionPlan, model: str, epoch: int, backend: str = "pipeline",
               infos: list[pb.NodeInfo] = (), auto_reform: bool = False,
               rejoin_settle_s: float | None = None) -> pb.Plan:
    """The wire form of a plan over these nodes (their ring ports for mlx-ring);
    `rejoin_settle_s` None: it takes no joiners."""
    return to_proto(plan, model, epoch, backend, {i.node_id: i.ring_port for i in infos},
                    auto_reform, rejoin_settle_s)


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


async def load_plan(clients: list[NodeClient], model: str, dtype: str, layers: int,
                    strategy: str, progress: Callable[[str], None] = _to_stderr,
                    backend: str = "pipeline", auto_reform: bool = False,
                    auto_rejoin: bool | None = None,
                    rejoin_settle_s: float = REJOIN_SETTLE_S, stage: bool = True,
                    microbatches: int = 0) -> tuple[pb.Plan, list[pb.ShardInfo]]:
    """Plan `model` over the nodes and load every shard at once. For mlx-ring the node
    services start one worker each and the loads return once the group has formed.
    `auto_rejoin` (None: on unless the split is manual) lets the plan take in nodes that
    join or come back, once they have been up `rejoin_settle_s` (node/membership.py).
    `stage` False: every node drops the plan it serves before it loads (requests wait for
    the whole load), even where its memory would hold both. `microbatches`: decode groups
    in flight round a pipeline (0: one per node; 1: one batch in lockstep; node/engine.py)."""
    if not 0 <= microbatches <= MAX_MICROBATCHES:
        raise ClusterError(f"--microbatches {microbatches}: use 1 to {MAX_MICROBATCHES} "
                           "(1: one batch in lockstep), or 0 for one per node")
    infos = await live_infos(clients)
    plan, _ = partition(infos, model, dtype, layers, strategy, backend)
    epoch = next_epoch(infos)
    if auto_rejoin is None:
        auto_rejoin = not strategy.startswith("manual:")
    proto = proto_plan(plan, model, epoch, backend, infos, auto_reform,
                       rejoin_settle_s if auto_rejoin else None)
    proto.microbatches = microbatches
    progress(f"loading {model} ({plan.n_layers} layers, {backend}, {plan.strategy}) on "
             f"{len(clients)} node(s), epoch {epoch}")
    options = pb.ModelOptions(dtype=dtype, layers=layers)
    client_of = {i.node_id: c for c, i in zip(clients, infos)}
    t0 = time.perf_counter()

    async def one(shard: pb.PlanShard) -> pb.LoadShardReply:
        reply = await client_of[shard.node_id].load(proto, options, stage=stage)
        part = (f"rank {reply.shard.ring.rank}/{reply.shard.ring.size} "
                f"({reply.shard.ring.parallel})" if reply.shard.HasField("ring")
                else f"layers {shard.start_layer}-{shard.end_layer}")
        progress(f"  {shard.address}: {part} "
                 f"{'staged beside the serving plan' if reply.staged else 'loaded'} "
                 f"({reply.shard.weight_bytes / 2**20:.0f} MiB, {reply.shard.form}) "
                 f"after {time.perf_counter() - t0:.1f} s")
        return reply

    # each node loads beside the plan it serves where its memory holds both (the old plan
    # serves meanwhile), then all switch together: requests in flight go on under the new
    # plan, and wait only for the switch (node/staging.py)
    results = await asyncio.gather(*(one(s) for s in proto.shards), return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        raise ClusterError("load failed: " + "; ".join(str(e) for e in errors))
    staged = [client_of[s.node_id] for s, r in zip(proto.shards, results) if r.staged]
    if staged:
        await asyncio.gather(*(c.activate(epoch) for c in staged))
        progress(f"  switched {len(staged)} node(s) to epoch {epoch}")
    return proto, [r.shard for r in results]  # type: ignore[union-attr]


async def rebalance(clients: list[NodeClient], progress: Callable[[str], None] = _to_stderr
                    ) -> tuple[pb.Plan, list[pb.ShardInfo], list[str]]:
    """Load the newest loaded plan's model again over every node that answers now (the
    same backend, strategy and joining rules), re-admitting nodes a recovery left out. The
    plan's members are asked too, at the addresses the plan has for them (a member that
    restarted on another port is found there once it has rejoined). Also returns the nodes
    it knew about that did not answer and so were left out: `clients` and plan members."""
    infos = await gather_infos(clients)
    live = [(c, i) for c, i in zip(clients, infos) if not isinstance(i, ClusterError)]
    if not live:
        raise ClusterError("no node is up")
    loaded = [i for _, i in live if i.HasField("plan")]
    if not loaded:
        raise ClusterError("nothing is loaded; use mlx-cluster load --model SPEC")
    plan = max((i.plan for i in loaded), key=lambda p: p.epoch)
    seen = {i.node_id for _, i in live} | {c.address for c in clients}
    extra = [NodeClient(s.address, clients[0].timeout_s, clients[0].token, clients[0].tls_ca)
             for s in plan.shards if s.node_id not in seen and s.address not in seen]
    try:
        found = await gather_infos(extra)
        live += [(c, i) for c, i in zip(extra, found) if not isinstance(i, ClusterError)]
        left_out = [str(i) for i in [*infos, *found] if isinstance(i, ClusterError)]
        layers = plan.n_layers if plan.model.startswith(SYNTHETIC_PREFIX) else 0
        new, shards = await load_plan(
            [c for c, _ in live], plan.model, "", layers, plan.strategy or DEFAULT_STRATEGY,
            progress=progress, backend=backend_label(plan.backend, plan.parallel),
            auto_reform=plan.auto_reform, auto_rejoin=plan.auto_rejoin,
            rejoin_settle_s=plan.rejoin_settle_s or REJOIN_SETTLE_S,
            microbatches=plan.microbatches)
    finally:
        await asyncio.gather(*(c.close() for c in extra))
    return new, shards, left_out


STEP_ROWS = 16  # the batch a plan's predicted stage times are given for


def plan_rows(plan: pb.Plan, speeds: dict[str, float] | None = None) -> list[dict]:
    """One row per shard: node, layers and a layer map, estimated bytes, the stage's share
    of a token's work and (where `speeds`, node id -> calibrated GFLOP/s, has the node)
    its predicted time for a forward of STEP_ROWS rows."""
    speeds = speeds or {}
    work = sum(s.macs_per_token for s in plan.shards) or 1
    return [{"node": s.node_id, "name": s.name, "address": s.address,
             "start_layer": s.start_layer, "end_layer": s.end_layer,
             "layers": s.end_layer - s.start_layer + 1,
             "bar": layer_bar(s.start_layer, s.end_layer, plan.n_layers),
             "param_bytes": s.param_bytes, "kv_bytes": s.kv_bytes,
             "total_bytes": s.param_bytes + s.kv_bytes,
             "macs_per_token": s.macs_per_token, "work_share": s.macs_per_token / work,
             "predicted_step_s": stage_seconds(s.macs_per_token, STEP_ROWS,
                                               speeds.get(s.node_id, 0.0)) or None}
            for s in plan.shards]


# ---------------------------------------------------------------- generate


@dataclass
class Generation:
    """One finished generation as the entry node streamed it."""

    text: str
    token_ids: list[int]
    logprobs: list[float] | None  # None unless every token came with one
    tokens_per_s: float
    ttft_s: float
    total_s: float
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    epoch: int
    model: str
    shards: list[dict] = field(default_factory=list)  # node, address, start/end layer

    def to_dict(self) -> dict:
        """What `mlx-cluster generate --json` prints."""
        return {"text": self.text, "token_ids": self.token_ids,
                **({"logprobs": self.logprobs} if self.logprobs is not None else {}),
                "tokens_per_s": self.tokens_per_s, "ttft_s": self.ttft_s,
                "total_s": self.total_s, "finish_reason": self.finish_reason,
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "epoch": self.epoch,
                "model": self.model, "shards": self.shards}


async def stream(clients: list[NodeClient], request: pb.GenerateRequest,
                 on_resume: Callable[[str, int], None] | None = None,
                 entry: list[pb.NodeInfo] | None = None) -> AsyncIterator[pb.GenerateEvent]:
    """Generate's events for `request` from the entry node, across entry nodes: if the
    entry node is lost mid-stream, the request goes on as a continuation on the new entry
    once the survivors have re-planned (node.resume), with no token repeated or missing.
    `on_resume(address, tokens)` is told of each continuation; `entry`, when given, ends
    up holding the info of the entry node that finished the request."""
    by_address = {c.address: c for c in clients}

    async def find_entry(gone: set[str], again: bool) -> str:  # always a fresh look
        try:
            client, info = await entry_client([c for c in clients if c.address not in gone])
        except EntryPending:
            raise  # resumable waits for it
        except ClusterError as e:
            raise NoEntry(str(e)) from None
        if entry is not None:
            entry[:] = [info]
        return client.address

    metadata = clients[0].metadata if clients else ()
    try:
        async for event in resumable(request, find_entry, lambda a: by_address[a].channel,
                                     metadata, on_resume):
            yield event
    except grpc.aio.AioRpcError as e:
        address = entry[0].address if entry else "the entry node"
        raise ClusterError(describe_rpc_error(address, e)) from e
    except NoEntry as e:  # none now and none coming, or one that did not come in time
        if isinstance(e, ClusterError):
            raise
        raise ClusterError(str(e)) from e


async def generate(clients: list[NodeClient], request: pb.GenerateRequest,
                   on_text: Callable[[str], None] = lambda text: None,
                   on_resume: Callable[[str, int], None] | None = None) -> Generation:
    """Send a request to the entry node, passing each piece of text to `on_text` as it
    arrives (once: a continuation on a new entry node repeats none). Nodes that are down
    are left out."""
    entry: list[pb.NodeInfo] = []
    ids, parts, logprobs, done = [], [], [], None
    async for event in stream(clients, request, on_resume, entry):
        if event.HasField("token"):
            ids.append(event.token.token_id)
            if event.token.HasField("logprob"):
                logprobs.append(event.token.logprob)
            parts.append(event.token.text)
            on_text(event.token.text)
        else:
            done = event.done
            parts.append(done.tail_text)
            on_text(done.tail_text)
    info = entry[0]
    if done is None:
        raise ClusterError(f"the stream from {info.address} ended without a result")
    return Generation(
        text="".join(parts), token_ids=ids,
        logprobs=logprobs if ids and len(logprobs) == len(ids) else None,
        tokens_per_s=done.decode_tokens_per_s, ttft_s=done.ttft_s, total_s=done.total_s,
        finish_reason=done.finish_reason, prompt_tokens=done.prompt_tokens,
        completion_tokens=done.completion_tokens, epoch=done.epoch, model=info.plan.model,
        shards=[{"node": s.node_id, "address": s.address, "start_layer": s.start_layer,
                 "end_layer": s.end_layer} for s in info.plan.shards])


# ---------------------------------------------------------------- choosing nodes


async def pick_nodes(clients: list[NodeClient], wanted: list[str],
                     connection: Connection | None = None) -> list[NodeClient]:
    """The clients whose node name, id or address is in `wanted` (all when empty); a
    host:port that none of them has gets a client of its own."""
    if not wanted:
        return clients
    infos = await gather_infos(clients)
    chosen = []
    for want in wanted:
        match = [c for c, i in zip(clients, infos) if want == c.address or (
            not isinstance(i, ClusterError) and want in (i.name, i.node_id))]
        if not match and ":" in want:
            match = [(connection or Connection()).client(want)]
        if not match:
            known = ", ".join(i.name for i in infos if not isinstance(i, ClusterError))
            raise ClusterError(f"no node named {want!r} (known: {known})")
        chosen += match
    return chosen
