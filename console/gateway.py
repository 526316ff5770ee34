"""`mlx-cluster serve-api`: the OpenAI-compatible HTTP API (node/api.py) run on its own,
in front of the nodes the console knows, with model loading (POST /v1/models/load) done
by console.ops as `mlx-cluster load` does it."""

from __future__ import annotations

import logging
from collections.abc import Callable

from console import ops
from console.client import ClusterError, to_dict
from console.ops import Connection
from node.api import MAX_BODY_BYTES
from node.api import serve as serve_api
from node.plan import DEFAULT_STRATEGY

log = logging.getLogger(__name__)


def loader(connection: Connection):
    """POST /v1/models/load: plan and load the body's model over the nodes that answer."""
    async def load(addresses: list[str], body: dict) -> dict:
        async with ops.connect(addresses, connection) as clients:
            plan, shards = await ops.load_plan(
                clients, str(body["model"]), str(body.get("dtype", "")), 0,
                str(body.get("strategy", DEFAULT_STRATEGY)),
                progress=lambda m: log.info("%s", m.strip()),
                backend=str(body.get("backend", "pipeline")))
        return {"plan": to_dict(plan), "shards": [to_dict(s) for s in shards]}

    return load


def serve(addresses: list[str], host: str, port: int, token: str | None = None,
          connection: Connection | None = None, max_body_bytes: int = MAX_BODY_BYTES,
          on_ready: Callable[[str], None] | None = None, api_key: str | None = None) -> None:
    """Run the API until SIGINT/SIGTERM; `on_ready(url)` once it listens."""
    connection = connection or Connection()
    try:
        serve_api(addresses, host, port, token, connection.tls_ca, max_body_bytes, on_ready,
                  loader(connection), api_key)
    except OSError as e:
        raise ClusterError(str(e)) from e
