"""`mlx-cluster serve-api`: an OpenAI-compatible HTTP gateway over the loaded plan.

Existing clients and tools (the official `openai` package, anything that speaks to exo
on :52415 or to `mlx_lm.server`) point at the gateway; it turns each request into one
`Generate` stream to the plan's entry node and the events back into OpenAI's JSON or
server-sent events. Built on aiohttp, the asyncio HTTP stack, so HTTP and gRPC share one
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
import time
import uuid
from collections.abc import AsyncIterator

from aiohttp import web

from console import ops
from console.client import ClusterError, NodeClient, gather_infos, to_dict
from console.openai_api import ApiError, Sampling, StopText, usage
from console.ops import Connection
from protos import cluster_pb2 as pb

log = logging.getLogger(__name__)
DEFAULT_PORT = 52415  # exo's, so clients configured for exo work unchanged
MAX_BODY_BYTES = 1024 * 1024
ENTRY_TTL_S = 2.0


class Gateway:
    """The HTTP app and the cluster it fronts."""

    def __init__(self, addresses: list[str], token: str | None = None,
                 connection: Connection | None = None, default_max_tokens: int = 256,
                 max_body_bytes: int = MAX_BODY_BYTES) -> None:
        self.addresses = addresses
        self.token = token
        self.connection = connection or Connection()
        self.default_max_tokens = default_max_tokens
        self.max_body_bytes = max_body_bytes
        self.clients: list[NodeClient] = []
        self._tokenizers: dict[str, object] = {}
        self.in_flight = 0
        self.served = 0
        self._entry_cache: tuple[float, tuple[NodeClient, pb.NodeInfo]] | None = None

    # ------------------------------------------------------------ app

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.max_body_bytes,
                              middlewares=[self._errors])
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/cluster", self.cluster)
        app.router.add_post("/v1/models/load", self.load)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        app.on_startup.append(self._open)
        app.on_cleanup.append(self._close)
        return app

    async def _open(self, app: web.Application) -> None:
        # gRPC channels belong to the running loop: made here, not before the app runs
        self.clients = [self.connection.client(a) for a in self.addresses]

    async def _close(self, app: web.Application) -> None:
        await asyncio.gather(*(c.close() for c in self.clients))

    @web.middleware
    async def _errors(self, request: web.Request, handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as e:
            return e.response()
        except web.HTTPRequestEntityTooLarge:
            return ApiError(413, f"request body over {self.max_body_bytes} bytes",
                            code="request_too_large").response()
        except web.HTTPException as e:  # aiohttp's own 404 / 405
            return ApiError(e.status, e.reason or "not found",
                            code="not_found" if e.status == 404 else None).response()
        except ClusterError as e:
            self._entry_cache = None  # the plan may have moved: look again next time
            return ApiError(503, str(e), kind="server_error", code="cluster_error").response()
        except Exception as e:  # a bug must still answer in the shape clients parse
            log.exception("request failed")
            return ApiError(500, f"{type(e).__name__}: {e}", kind="server_error").response()

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
        header = request.headers.get("Authorization", "")
        if header != f"Bearer {self.token}":
            raise ApiError(401, "this endpoint needs the cluster token: "
                                "Authorization: Bearer <token>",
                           kind="authentication_error", code="invalid_api_key")

    # ------------------------------------------------------------ cluster state

    async def _entry(self) -> tuple[NodeClient, pb.NodeInfo]:
        """The plan's entry node, looked up at most every ENTRY_TTL_S (a GetInfo to every
        node per request would load the nodes that are busy serving)."""
        now = time.monotonic()
        if self._entry_cache is not None and now - self._entry_cache[0] < ENTRY_TTL_S:
            return self._entry_cache[1]
        found = await self._find_entry()
        self._entry_cache = (now, found)
        return found

    async def _find_entry(self) -> tuple[NodeClient, pb.NodeInfo]:
        try:
            return await ops.entry_client(self.clients)
        except ops.NoNodeUp as e:
            raise ApiError(503, "no cluster node answers; start them (mlx-cluster local up "
                                "or mlx-node serve)", kind="server_error",
                           code="cluster_down") from e
        except ClusterError as e:
            raise ApiError(503, str(e), kind="server_error", code="model_not_loaded") from e

    async def _tokenizer(self, model: str):
        """The loaded model's tokenizer and context length, read once (off the loop)."""
        if model not in self._tokenizers:
            from node.errors import ModelError
            from node.models import resolve
            from node.tokenizers import prompt_tokenizer

            def read():
                source = resolve(model)
                return prompt_tokenizer(source), source.context_length

            try:
                self._tokenizers[model] = await asyncio.to_thread(read)
            except (ModelError, OSError, ValueError) as e:
                raise ApiError(500, f"cannot read {model}'s tokenizer on the gateway's "
                                    f"machine: {e}", kind="server_error") from e
        return self._tokenizers[model]

    async def _loaded_model(self, asked: object) -> tuple[NodeClient, str]:
        client, info = await self._entry()
        if asked not in (None, "", info.plan.model):  # a new plan since we looked?
            self._entry_cache = None
            client, info = await self._entry()
        model = info.plan.model
        if asked not in (None, "", model):
            raise ApiError(404, f"the model {asked!r} is not loaded; this cluster serves "
                                f"{model!r} (GET /v1/models)", code="model_not_found",
                           param="model")
        return client, model

    # ------------------------------------------------------------ endpoints

    async def health(self, request: web.Request) -> web.Response:
        infos = await gather_infos(self.clients)
        up = [i for i in infos if not isinstance(i, ClusterError)]
        model = next((i.plan.model for i in up if i.HasField("plan")), None)
        return web.json_response({"status": "ok" if up else "down", "nodes": len(infos),
                                  "nodes_up": len(up), "model": model,
                                  "in_flight": self.in_flight, "served": self.served},
                                 status=200 if up else 503)

    async def models(self, request: web.Request) -> web.Response:
        infos = [i for i in await gather_infos(self.clients) if not isinstance(i, ClusterError)]
        models = sorted({i.plan.model for i in infos if i.HasField("plan")})
        return web.json_response({"object": "list", "data": [
            {"id": m, "object": "model", "created": 0, "owned_by": "mlx-cluster"}
            for m in models]})

    async def cluster(self, request: web.Request) -> web.Response:
        infos = await gather_infos(self.clients)
        nodes = [{"address": c.address, "up": False, "error": str(i)}
                 if isinstance(i, ClusterError) else {"address": c.address, "up": True,
                                                      **to_dict(i)}
                 for c, i in zip(self.clients, infos)]
        plans = [i.plan for i in infos if not isinstance(i, ClusterError) and i.HasField("plan")]
        plan = max(plans, key=lambda p: p.epoch) if plans else None
        return web.json_response({"nodes": nodes, "plan": to_dict(plan) if plan else None,
                                  "gateway": {"in_flight": self.in_flight,
                                              "served": self.served}})

    async def load(self, request: web.Request) -> web.Response:
        self._authorise(request)
        body = await self._body(request)
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise ApiError(400, "give the model to load: {\"model\": \"smollm2-135m\"}",
                           param="model")
        live = [c for c, i in zip(self.clients, await gather_infos(self.clients))
                if not isinstance(i, ClusterError)]
        if not live:
            raise ApiError(503, "no cluster node answers", kind="server_error")
        plan, shards = await ops.load_plan(live, model, str(body.get("dtype", "")), 0,
                                           str(body.get("strategy", "memory")),
                                           progress=lambda m: log.info("%s", m.strip()),
                                           backend=str(body.get("backend", "pipeline")))
        self._entry_cache = None
        return web.json_response({"plan": to_dict(plan), "shards": [to_dict(s) for s in shards]})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str) for m in messages):
            raise ApiError(400, "messages must be a non-empty list of {role, content} with "
                                "text content", param="messages")
        client, model = await self._loaded_model(body.get("model"))
        tokenizer, context = await self._tokenizer(model)
        ids = tokenizer.encode_messages([{"role": m["role"], "content": m["content"]}
                                         for m in messages])
        return await self._serve(request, body, client, model, ids, context, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise ApiError(400, "prompt must be a non-empty string", param="prompt")
        client, model = await self._loaded_model(body.get("model"))
        tokenizer, context = await self._tokenizer(model)
        ids = tokenizer.encode(prompt, chat=False)
        return await self._serve(request, body, client, model, ids, context, chat=False)

    # ------------------------------------------------------------ generation

    async def _serve(self, request: web.Request, body: dict, client: NodeClient, model: str,
                     ids: list[int], context: int, chat: bool) -> web.StreamResponse:
        sampling = Sampling.parse(body, self.default_max_tokens)
        if len(ids) >= context:
            raise ApiError(400, f"the prompt is {len(ids)} tokens; this model's context is "
                                f"{context} tokens", code="context_length_exceeded",
                           param="messages" if chat else "prompt")
        max_tokens = min(sampling.max_tokens, context - len(ids))
        # ignore_eos: not OpenAI's, but vLLM's extra parameter, for benchmarks
        grpc_request = pb.GenerateRequest(prompt_ids=ids, max_tokens=max_tokens,
                                          sampling=sampling.proto(),
                                          ignore_eos=body.get("ignore_eos") is True)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        self.in_flight += 1
        try:
            if body.get("stream"):
                return await self._stream(request, client, grpc_request, sampling, rid,
                                          created, model, chat)
            text, finish, usage = await self._collect(request, client, grpc_request,
                                                      sampling)
        finally:
            self.in_flight -= 1
        self.served += 1
        choice = ({"index": 0, "message": {"role": "assistant", "content": text},
                   "logprobs": None, "finish_reason": finish} if chat else
                  {"index": 0, "text": text, "logprobs": None, "finish_reason": finish})
        return web.json_response({"id": rid, "object": "chat.completion" if chat else
                                  "text_completion", "created": created, "model": model,
                                  "choices": [choice], "usage": usage})

    async def _events(self, client: NodeClient, request: pb.GenerateRequest,
                      stop: StopText) -> AsyncIterator[tuple[str, str | None, dict | None]]:
        """(text to send, finish reason at the end, usage at the end)."""
        completion = 0
        async for event in client.generate(request):
            if event.HasField("token"):
                completion += 1
                text = stop.feed(event.token.text)
                if stop.stopped:
                    yield text, "stop", usage(len(request.prompt_ids), completion)
                    return  # leaving the stream cancels it: the nodes free the caches
                yield text, None, None
            else:
                done = event.done
                yield (stop.feed(done.tail_text) + stop.flush(), done.finish_reason,
                       usage(done.prompt_tokens, done.completion_tokens))
                return

    async def _collect(self, http: web.Request, client: NodeClient,
                       request: pb.GenerateRequest, sampling: Sampling
                       ) -> tuple[str, str, dict]:
        parts, finish, usage = [], "length", {}
        events = self._events(client, request, StopText(sampling.stop))
        try:
            async for text, end, counts in events:
                if http.transport is None or http.transport.is_closing():
                    # the client left (aiohttp does not cancel the handler): stop the work
                    raise ApiError(499, "the client closed the connection",
                                   code="client_closed")
                parts.append(text)
                if end is not None:
                    finish, usage = end, counts or {}
        finally:
            await events.aclose()  # cancels the gRPC stream if it is still open
        return "".join(parts), finish, usage

    async def _stream(self, request: web.Request, client: NodeClient,
                      grpc_request: pb.GenerateRequest, sampling: Sampling, rid: str,
                      created: int, model: str, chat: bool) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache"})
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: str | None, finish: str | None, first: bool = False) -> bytes:
            if chat:
                delta = {"role": "assistant", "content": ""} if first else (
                    {"content": text} if text else {})
                choice = {"index": 0, "delta": delta, "logprobs": None,
                          "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None,
                          "finish_reason": finish}
            data = {"id": rid, "object": kind, "created": created, "model": model,
                    "choices": [choice]}
            return f"data: {json.dumps(data)}\n\n".encode()

        events = self._events(client, grpc_request, StopText(sampling.stop))
        try:
            first = await anext(events)  # errors before the first token are HTTP errors
        except StopAsyncIteration:
            first = ("", "length", {})
        await response.prepare(request)
        try:
            if chat:
                await response.write(chunk(None, None, first=True))
            item = first
            while True:
                text, finish, _ = item
                if text or finish:
                    await response.write(chunk(text, finish))
                if finish:
                    break
                item = await anext(events)
            await response.write(b"data: [DONE]\n\n")
            self.served += 1
        except (ConnectionResetError, asyncio.CancelledError):
            log.info("client left mid-stream: request %s cancelled", rid)
            raise
        except ClusterError as e:  # mid-stream: the status line is gone; say it in-band
            self._entry_cache = None
            error = {"error": {"message": str(e), "type": "server_error", "param": None,
                               "code": "cluster_error"}}
            await response.write(f"data: {json.dumps(error)}\n\n".encode())
        finally:
            await events.aclose()  # cancels the gRPC stream if it is still open
        return response


def serve(addresses: list[str], host: str, port: int, token: str | None = None,
          connection: Connection | None = None, max_body_bytes: int = MAX_BODY_BYTES,
          on_ready=None) -> None:
    """Run the gateway until SIGINT/SIGTERM; `on_ready(url)` once it listens."""
    import signal

    gateway = Gateway(addresses, token, connection, max_body_bytes=max_body_bytes)

    async def main() -> None:
        runner = web.AppRunner(gateway.app())
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as e:
            await runner.cleanup()
            raise ClusterError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e
        bound = runner.addresses[0][1]  # the real port when port 0 was asked for
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

    asyncio.run(main())
