"""The fail-over policy of Generate on the entry node: a request whose plan breaks under
it (a peer died, frames were lost, a peer is still loading a new epoch) is retried, and
the client's stream goes on with no gap and no duplicate.

The tokens the client already has are replayed on the retry (node/runner.py), so greedy
output is the same as without the failure. What is retried, and how often:
- frames lost on the way (DEADLINE_EXCEEDED, DATA_LOSS): replayed on the same plan;
- a peer still loading the new epoch (ABORTED): retried every 0.2 s for up to
  FAILOVER_WAIT_S, which does not count as a fault;
- a peer gone (UNAVAILABLE, FAILED_PRECONDITION) while a recovery runs or a coordinator
  watches the plan: retried once the survivors have loaded the new epoch.
A request may also arrive as a client's continuation (`resume_ids`, `resume_chars`: its
entry node was lost; node/resume.py): its tokens are replayed the same way.
At most MAX_RETRIES faults per request in a row, MAX_LOSS_RETRIES for lost frames (a
token in between starts the count again: under steady frame loss a request makes
progress and is not stuck); anything else fails it with the error.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any, Protocol

from node.errors import BadFrame, EntryMoved, NodeError, NotLoaded
from node.metrics import NodeMetrics
from node.runner import Runner
from protos import cluster_pb2 as pb

log = logging.getLogger(__name__)

MAX_RETRIES = 3  # fail-overs one request may go through in a row
MAX_LOSS_RETRIES = 10  # replays after lost frames in a row (each loses a frame or two)
FAILOVER_WAIT_S = 60.0  # how long a request waits for the survivors to reload


class EntryNode(Protocol):
    """What the policy needs from the node service."""

    runner: Runner | None
    coordinator: Any  # node.coordinator.Coordinator | None
    metrics: NodeMetrics
    recovery_error: str

    @property
    def loading(self) -> bool: ...

    async def wait_for_epoch_after(self, epoch: int, timeout_s: float) -> bool: ...

    def note_resumed(self, seconds: float | None = None) -> None: ...


async def generate(node: EntryNode, request: pb.GenerateRequest
                   ) -> AsyncIterator[pb.GenerateEvent]:
    """The request's events, across as many plans as it takes (raises NodeError when it
    cannot go on)."""
    behind_since = 0.0  # start of the current run of "peer still loading" answers
    resumed_at = 0.0  # when a fail-over to a new plan completed, until the next token
    # tokens the client has (a continuation brings those it got from a lost entry node),
    # replayed after a fail-over, and the characters of their text it has shown
    already: list[int] = list(request.resume_ids)
    emitted = request.resume_chars
    continuation = bool(already)
    retries = 0
    while True:
        runner = node.runner
        if runner is not None and not runner.is_first:  # the client's mistake: not retried
            info = runner.shard_info()
            raise EntryMoved(f"this node holds layers {info.start_layer}-{info.end_layer} "
                             f"of plan epoch {runner.epoch}; send Generate to the first "
                             f"shard at {runner.entry_address}")
        try:
            if runner is None:
                raise NotLoaded("no model is loaded; run: mlx-cluster load --model SPEC")
            vocab = int(runner.source.config["vocab_size"])
            if any(t >= vocab for t in already):
                raise BadFrame(f"resume_ids: a token id is outside the vocabulary ({vocab})")
            async for event in runner.generate(request, already, emitted):
                if event.HasField("token"):
                    behind_since = 0.0
                    retries = 0  # a request that makes progress is not stuck
                    already.append(event.token.token_id)
                    emitted += len(event.token.text)
                    if resumed_at:
                        node.note_resumed(time.monotonic() - resumed_at)
                        resumed_at = 0.0
                    elif continuation:
                        node.note_resumed(None)
                    continuation = False
                yield event
            return
        except NodeError as e:
            recovering = (node.coordinator is not None and node.coordinator.recovering
                          ) or node.loading or (runner is not None and node.runner is not runner)
            lost = e.code in ("DEADLINE_EXCEEDED", "DATA_LOSS")  # frames went missing
            behind = e.code == "ABORTED"  # a peer is still loading the new epoch
            retryable = lost or behind or (
                e.code in ("UNAVAILABLE", "FAILED_PRECONDITION") and (
                    recovering or node.coordinator is not None))
            if behind:
                behind_since = behind_since or time.monotonic()
                if time.monotonic() - behind_since < FAILOVER_WAIT_S:
                    retries = min(retries, MAX_RETRIES - 1)  # a load, not a fault
            if not retryable or retries >= (MAX_LOSS_RETRIES if lost else MAX_RETRIES):
                raise
            retries += 1
            node.metrics.inc("requests_retried")
            log.warning("request retried after: %s", e)
            if behind:
                await asyncio.sleep(0.2)
                continue
            if lost and not recovering:
                continue  # replay on the same plan
            if not await node.wait_for_epoch_after(runner.epoch if runner else 0,
                                                   FAILOVER_WAIT_S):
                raise NodeError(f"{e}; no recovery: "
                                f"{node.recovery_error or 'timed out waiting'}") from e
            resumed_at = time.monotonic()
