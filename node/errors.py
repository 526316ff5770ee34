"""Errors a node raises for things a user or a peer got wrong.

Each carries a gRPC status code name so the service can answer with a precise
status instead of a generic INTERNAL, and a message that says what to do.
"""

from __future__ import annotations


class NodeError(Exception):
    """Base class: a request failed for a reason the caller can act on."""

    code = "INTERNAL"


class ModelError(NodeError):
    """Unknown or unusable model spec, missing files, bad layer range."""

    code = "INVALID_ARGUMENT"


class BadFrame(NodeError):
    """A Forward frame whose tensor, shape, dtype or request is wrong."""

    code = "INVALID_ARGUMENT"


class FrameGap(NodeError):
    """A frame arrived after positions this shard never saw: frames were lost."""

    code = "DATA_LOSS"


class EpochNotLoaded(NodeError):
    """A frame for a newer plan than this node holds: it is still loading; retry soon."""

    code = "ABORTED"


class StaleEpoch(NodeError):
    """A message for a plan epoch other than the one this node holds."""

    code = "FAILED_PRECONDITION"


class NotLoaded(NodeError):
    """The node holds no shard (or not the one the caller assumed)."""

    code = "FAILED_PRECONDITION"


class PeerUnavailable(NodeError):
    """The next shard in the plan cannot be reached."""

    code = "UNAVAILABLE"


class ContextOverflow(NodeError):
    """The prompt does not fit the model's context length."""

    code = "OUT_OF_RANGE"


class RequestTimeout(NodeError):
    """A token did not come back round the ring in time."""

    code = "DEADLINE_EXCEEDED"


class OverBudget(NodeError):
    """Loading the shard would take more memory than the node's budget."""

    code = "RESOURCE_EXHAUSTED"


class ModelCodeError(NodeError):
    """The model's own (mlx-lm) code raised while loading or running this node's shard."""

    code = "FAILED_PRECONDITION"


class PrefixEvicted(NodeError):
    """A shard no longer holds the cached prompt prefix the first shard chose to reuse:
    the first shard runs the request again without reuse (node/prompts.py)."""

    code = "NOT_FOUND"


class EntryMoved(NodeError):
    """Generate reached a node that is not (or no longer, after a new plan) the plan's
    entry: the client looks up the entry again and goes on there (node/resume.py)."""

    code = "ABORTED"
