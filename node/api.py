"""An OpenAI-compatible HTTP API over the loaded plan, served by any node or standalone.

Existing clients and tools (the official `openai` package, anything that speaks to exo
on :52415 or to `mlx_lm.server`) point at it; it turns each request into one `Generate`
stream to the plan's entry node and the events back into OpenAI's JSON or server-sent
events. It needs no tokenizer and no model files: chat messages and stop strings go to the
entry node as they are, which templates the messages and ends generation at a stop string.
Every request goes through node.resume's `resumable`, so when the entry node is lost
mid-answer the survivors' new entry goes on from the tokens already sent.

`mlx-node serve --api-port N` runs it inside the node (`start_node_api`: the same event
loop, the node's peer channels, the nodes of its plan); `mlx-cluster serve-api` runs it
alone (`serve`) for the nodes it is given. Built on aiohttp, so HTTP and gRPC share one
event loop.

Endpoints: `POST /v1/chat/completions`, `POST /v1/completions` (streaming or not;
temperature, top_p, max_tokens, stop, seed), `GET /v1/models`, `GET /health`,
`GET /v1/cluster` (nodes and plan) and `POST /v1/models/load` (needs the token when one
is set). Errors use OpenAI's shape: {"error": {"message", "type", "param", "code"}}.
A client that goes away mid-stream cancels its gRPC stream, so the nodes free its caches.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
from aiohttp import web

from node.api_nodes import Nodes, NoNodeUp, plan_addresses
from node.auth import bearer_matches
from node.jsonform import to_dict
from node.openai_api import (
    ApiError,
    chat_request,
    chunk,
    completion,
    completion_request,
    rpc_error,
    usage,
)
from node.peers import PeerChannels
from node.resume import NoEntry, Pending, resumable
from protos import cluster_pb2 as pb

log = logging.getLogger(__name__)
DEFAULT_PORT = 52415  # exo's, so clients configured for exo work unchanged
MAX_BODY_BYTES = 1024 * 1024
LOAD_WAIT_S = 30.0  # a request that comes while a plan loads waits this long for it
LOAD_POLL_S = 0.2

# POST /v1/models/load: (addresses of the nodes that answer, the request body) -> JSON
Loader = Callable[[list[str], dict], Awaitable[dict]]


class Gateway:
    """The HTTP app and the nodes it fronts."""

    def __init__(self, nodes: Nodes, token: str | None = None, default_max_tokens: int = 256,
                 max_body_bytes: int = MAX_BODY_BYTES, loader: Loader | None = None,
                 api_key: str | None = None) -> None:
        self.nodes = nodes
        self.token = token
        self.api_key = api_key  # every /v1 endpoint needs it when set (/health does not)
        self.load_wait_s = LOAD_WAIT_S
        self.default_max_tokens = default_max_tokens
        self.max_body_bytes = max_body_bytes
        self.loader = loader
        self.in_flight = 0
        self.served = 0

    # ------------------------------------------------------------ app

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.max_body_bytes,
                              middlewares=[self._errors, self._keyed])
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/cluster", self.cluster)
        app.router.add_post("/v1/models/load", self.load)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPRequestEntityTooLarge:
            error = ApiError(413, f"request body over {self.max_body_bytes} bytes",
                             code="request_too_large")
        except web.HTTPException as e:  # aiohttp's own 404 / 405
            error = ApiError(e.status, e.reason or "not found",
                             code="not_found" if e.status == 404 else None)
        except ApiError as e:
            error = e
        except NoNodeUp as e:
            error = ApiError(503, f"no cluster node answers ({e}); start them (mlx-cluster "
                                  f"local up or mlx-node serve)", kind="server_error",
                             code="cluster_down")
        except NoEntry as e:
            error = ApiError(503, str(e), kind="server_error", code="model_not_loaded")
        except Exception as e:  # a bug must still answer in the shape clients parse
            log.exception("request failed")
            error = ApiError(500, f"{type(e).__name__}: {e}", kind="server_error")
        if error.status >= 500:
            self.nodes.forget_entry()  # the plan may have moved: look again next time
        headers = {"Retry-After": str(error.retry_after)} if error.retry_after else None
        return web.json_response(error.body(), status=error.status, headers=headers)

    @web.middleware
    async def _keyed(self, request: web.Request, handler) -> web.StreamResponse:
        """With an API key, every /v1 endpoint needs `Authorization: Bearer <key>` (as
        OpenAI clients send it); model loading takes the cluster token there instead."""
        keyed = self.api_key and request.path.startswith("/v1") and not (
            request.path == "/v1/models/load" and self.token)
        if keyed and not bearer_matches(request.headers.get("Authorization", ""),
                                        self.api_key):
            raise ApiError(401, "this API needs its key: Authorization: Bearer <key> "
                                "(openai clients: api_key=<key>)", code="invalid_api_key")
        return await handler(request)

    async def _body(self, request: web.Request) -> dict:
        try:
            body = await request.json()
        except web.HTTPRequestEntityTooLarge:
            raise
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as e:
            raise ApiError(400, f"the body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        return body

    def _authorise(self, request: web.Request) -> None:
        if self.token is None:
            return
        if not bearer_matches(request.headers.get("Authorization", ""), self.token):
            raise ApiError(401, "this endpoint needs the cluster token: "
                                "Authorization: Bearer <token>",
                           kind="authentication_error", code="invalid_api_key")

    async def _entry_info(self) -> pb.NodeInfo:
        """The entry node's info. While a plan loads (a reload under traffic) or the
        survivors of a lost entry node re-plan, waited for up to `load_wait_s`, then a 503
        with Retry-After that names what is on its way."""
        deadline = time.monotonic() + self.load_wait_s
        while True:
            try:
                return (await self.nodes.entry())[1]
            except Pending as e:
                if time.monotonic() > deadline:
                    raise ApiError(503, f"{e}; it did not finish within "
                                        f"{self.load_wait_s:.0f} s: retry shortly",
                                   kind="server_error", code="model_loading",
                                   retry_after=5) from None
                self.nodes.forget_entry()
                await asyncio.sleep(LOAD_POLL_S)

    async def _loaded_model(self, asked: object) -> str:
        info = await self._entry_info()
        if asked not in (None, "", info.plan.model):  # a new plan since we looked?
            self.nodes.forget_entry()
            info = await self._entry_info()
        model = info.plan.model
        if asked not in (None, "", model):
            raise ApiError(404, f"the model {asked!r} is not loaded; this cluster serves "
                                f"{model!r} (GET /v1/models)", code="model_not_found",
                           param="model")
        return model

    # ------------------------------------------------------------ endpoints

    async def health(self, request: web.Request) -> web.Response:
        infos = await self.nodes.infos()
        up = [i for _, i in infos if isinstance(i, pb.NodeInfo)]
        model = next((i.plan.model for i in up if i.HasField("plan")), None)
        return web.json_response({"status": "ok" if up else "down", "nodes": len(infos),
                                  "nodes_up": len(up), "model": model,
                                  "in_flight": self.in_flight, "served": self.served},
                                 status=200 if up else 503)

    async def models(self, request: web.Request) -> web.Response:
        models = sorted({i.plan.model for _, i in await self.nodes.live()
                         if i.HasField("plan")})
        return web.json_response({"object": "list", "data": [
            {"id": m, "object": "model", "created": 0, "owned_by": "mlx-cluster"}
            for m in models]})

    async def cluster(self, request: web.Request) -> web.Response:
        infos = await self.nodes.infos()
        nodes = [{"address": a, "up": True, **to_dict(i)} if isinstance(i, pb.NodeInfo)
                 else {"address": a, "up": False, "error": i} for a, i in infos]
        plans = [i.plan for _, i in infos if isinstance(i, pb.NodeInfo) and i.HasField("plan")]
        plan = max(plans, key=lambda p: p.epoch) if plans else None
        return web.json_response({"nodes": nodes, "plan": to_dict(plan) if plan else None,
                                  "gateway": {"in_flight": self.in_flight,
                                              "served": self.served}})

    async def load(self, request: web.Request) -> web.Response:
        self._authorise(request)
        if self.loader is None:
            raise ApiError(501, "this API does not load models; run mlx-cluster load "
                                "--model SPEC, or POST /v1/models/load to mlx-cluster "
                                "serve-api", code="not_supported")
        body = await self._body(request)
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise ApiError(400, "give the model to load: {\"model\": \"smollm2-135m\"}",
                           param="model")
        live = [a for a, _ in await self.nodes.live()]
        if not live:
            raise ApiError(503, "no cluster node answers", kind="server_error")
        loaded = await self.loader(live, body)
        self.nodes.forget_entry()
        return web.json_response(loaded)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        grpc_request = chat_request(body, self.default_max_tokens)
        model = await self._loaded_model(body.get("model"))
        return await self._serve(request, body, grpc_request, model, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        grpc_request = completion_request(body, self.default_max_tokens)
        model = await self._loaded_model(body.get("model"))
        return await self._serve(request, body, grpc_request, model, chat=False)

    # ------------------------------------------------------------ generation

    async def _serve(self, request: web.Request, body: dict, grpc_request: pb.GenerateRequest,
                     model: str, chat: bool) -> web.StreamResponse:
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        self.in_flight += 1
        try:
            if body.get("stream"):
                options = body.get("stream_options")
                include_usage = isinstance(options, dict) and options.get("include_usage") is True
                return await self._stream(request, grpc_request, rid, created, model, chat,
                                          include_usage)
            text, finish, counts = await self._collect(request, grpc_request, chat)
        finally:
            self.in_flight -= 1
        self.served += 1
        return web.json_response(completion(rid, created, model, chat, text, finish, counts))

    async def _events(self, request: pb.GenerateRequest, chat: bool
                      ) -> AsyncIterator[tuple[str, str | None, dict | None]]:
        """(text to send, finish reason at the end, usage at the end), across entry nodes
        (node.resume); a failure that ends the request as an ApiError."""
        entry = ""

        async def find_entry(gone: set[str], again: bool) -> str:
            nonlocal entry
            if again:
                self.nodes.forget_entry()
            entry = await self.nodes.entry_address(gone)
            return entry

        events = resumable(request, find_entry, self.nodes.channels.get,
                           on_resume=lambda address, n: log.warning(
                               "request continues on %s after %d token(s)", address, n))
        try:
            async for event in events:
                if event.HasField("token"):
                    yield event.token.text, None, None
                else:
                    done = event.done
                    yield done.tail_text, done.finish_reason, usage(done.prompt_tokens,
                                                                     done.completion_tokens)
                    return
        except grpc.aio.AioRpcError as e:
            self.nodes.forget_entry()
            raise rpc_error(e, entry, "messages" if chat else "prompt") from None
        finally:
            await events.aclose()  # cancels the gRPC stream if it is still open

    async def _collect(self, http: web.Request, request: pb.GenerateRequest, chat: bool
                       ) -> tuple[str, str, dict]:
        parts, finish, counts = [], "length", {}
        events = self._events(request, chat)
        try:
            async for text, end, done in events:
                if http.transport is None or http.transport.is_closing():
                    # the client left (aiohttp does not cancel the handler): stop the work
                    raise ApiError(499, "the client closed the connection",
                                   code="client_closed")
                parts.append(text)
                if end is not None:
                    finish, counts = end, done or {}
        finally:
            await events.aclose()
        return "".join(parts), finish, counts

    async def _stream(self, request: web.Request, grpc_request: pb.GenerateRequest, rid: str,
                      created: int, model: str, chat: bool,
                      include_usage: bool = False) -> web.StreamResponse:
        """Server-sent events; with stream_options.include_usage, a last chunk with no
        choices carries the usage, as OpenAI sends it."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache"})

        def sse(data: dict) -> bytes:
            return f"data: {json.dumps(data)}\n\n".encode()

        events = self._events(grpc_request, chat)
        try:
            first = await anext(events)  # errors before the first token are HTTP errors
        except StopAsyncIteration:
            first = ("", "length", {})
        await response.prepare(request)
        try:
            if chat:
                await response.write(sse(chunk(rid, created, model, chat, None, None, True)))
            item = first
            while True:
                text, finish, counts = item
                if text or finish:
                    await response.write(sse(chunk(rid, created, model, chat, text, finish)))
                if finish:
                    break
                item = await anext(events)
            if include_usage:
                last = chunk(rid, created, model, chat, None, None)
                await response.write(sse(dict(last, choices=[], usage=counts or {})))
            await response.write(b"data: [DONE]\n\n")
            self.served += 1
        except (ConnectionResetError, asyncio.CancelledError):
            log.info("client left mid-stream: request %s cancelled", rid)
            raise
        except ApiError as e:  # mid-stream: the status line is gone; say it in-band
            await response.write(sse(e.body()))
        finally:
            await events.aclose()  # cancels the gRPC stream if it is still open
        return response


# ---------------------------------------------------------------- running it


async def start(gateway: Gateway, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Listen on host:port in the running loop; the runner (to clean up) and the bound
    port (port 0 picks one). OSError when the port cannot be had."""
    runner = web.AppRunner(gateway.app())
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as e:
        await runner.cleanup()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e
    return runner, runner.addresses[0][1]


async def start_node_api(servicer, host: str, port: int,
                         api_key: str | None = None) -> tuple[web.AppRunner, int]:
    """A node's own API (`mlx-node serve --api-port`): the nodes of its plan and itself,
    through its peer channels, guarded by its cluster token."""
    def known() -> list[str]:
        runner = servicer.runner
        return plan_addresses(servicer.address, runner.plan if runner is not None else None)

    return await start(Gateway(Nodes(known, servicer.peers), servicer.token, api_key=api_key),
                       host, port)


def serve(addresses: list[str], host: str, port: int, token: str | None = None,
          tls_ca: Path | None = None, max_body_bytes: int = MAX_BODY_BYTES,
          on_ready: Callable[[str], None] | None = None, loader: Loader | None = None,
          api_key: str | None = None) -> None:
    """Run the API for these nodes until SIGINT/SIGTERM (`mlx-cluster serve-api`);
    `on_ready(url)` once it listens; `token` guards /v1/models/load, which `loader` does;
    `api_key` guards every /v1 endpoint."""
    async def main() -> None:
        channels = PeerChannels(tls_ca)
        nodes = Nodes(lambda: addresses, channels)
        gateway = Gateway(nodes, token, max_body_bytes=max_body_bytes, loader=loader,
                          api_key=api_key)
        try:
            runner, bound = await start(gateway, host, port)
            if on_ready is not None:
                on_ready(f"http://{host}:{bound}")
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            try:
                await stop.wait()
            finally:
                await runner.cleanup()
        finally:
            await channels.close()

    asyncio.run(main())
