"""OpenAI's API shapes for the HTTP API (node/api.py): errors in OpenAI's JSON, a request
body read and checked into a `GenerateRequest` (chat messages and stop strings go to the
node as they are: the entry node applies the chat template and matches the stop strings),
a gRPC error turned into the HTTP error a client expects, and the response bodies.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import grpc

from node.errors import BadFrame
from node.runner import check_messages, check_stops
from protos import cluster_pb2 as pb


class ApiError(Exception):
    """An error for the client, in OpenAI's shape."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None,
                 retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.code, self.param = status, kind, code, param
        self.retry_after = retry_after  # seconds, sent as Retry-After

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param,
                          "code": self.code}}


# OpenAI's parameters this API reads or accepts, with the JSON type OpenAI gives them: a
# value of another type is refused with a 400 that names the parameter (null counts as
# absent); fields not listed are ignored, as OpenAI ignores them
TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "model": ((str,), "a string"),
    "stream": ((bool,), "a boolean"),
    "stream_options": ((dict,), "an object"),
    "n": ((int,), "an integer"),
    "max_tokens": ((int,), "an integer"),
    "max_completion_tokens": ((int,), "an integer"),
    "temperature": ((int, float), "a number"),
    "top_p": ((int, float), "a number"),
    "presence_penalty": ((int, float), "a number"),
    "frequency_penalty": ((int, float), "a number"),
    "seed": ((int,), "an integer"),
    "stop": ((str, list), "a string or a list of strings"),
    "user": ((str,), "a string"),
    "echo": ((bool,), "a boolean"),
    "ignore_eos": ((bool,), "a boolean"),  # vLLM's
}


def check_types(body: dict) -> None:
    """Refuse a parameter of the wrong JSON type (a boolean is not a number), and `n` other
    than 1: this API returns one choice per request."""
    for name, (kinds, words) in TYPES.items():
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) != (bool in kinds) or not isinstance(value, kinds):
            raise ApiError(400, f"{name} must be {words}, not {type(value).__name__} "
                                f"{json_text(value)}", param=name)
    if body.get("n") not in (None, 1):
        raise ApiError(400, f"n must be 1: this server returns one choice per request "
                            f"(send {body['n']} requests for {body['n']} choices)", param="n")
    options = body.get("stream_options") or {}
    if not isinstance(options.get("include_usage", False), bool):
        raise ApiError(400, "stream_options.include_usage must be a boolean",
                       param="stream_options")


def json_text(value: object) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


@dataclass
class Sampling:
    """What a request asks for, checked."""

    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str] = field(default_factory=list)

    @classmethod
    def parse(cls, body: dict, default_max: int) -> Sampling:
        check_types(body)
        def number(name: str, default: float, low: float, high: float) -> float:
            value = body.get(name)
            if value is None:
                return default
            if isinstance(value, bool) or not isinstance(value, int | float) or not (
                    math.isfinite(value) and low <= value <= high):
                raise ApiError(400, f"{name} must be a number from {low} to {high}",
                               param=name)
            return float(value)

        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        if max_tokens is None:
            max_tokens = default_max
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not (
                1 <= max_tokens < 2**32):
            raise ApiError(400, "max_tokens must be a positive integer", param="max_tokens")
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)
                                 or not -2**63 <= seed < 2**63):
            raise ApiError(400, "seed must be a 64-bit integer", param="seed")
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise ApiError(400, "stop must be a string or a list of strings", param="stop")
        try:
            check_stops(stop)  # the node's own limits, said here with the parameter
        except BadFrame as e:
            raise ApiError(400, str(e), param="stop") from None
        return cls(max_tokens, number("temperature", 0.0, 0.0, 2.0),
                   number("top_p", 1.0, 0.0, 1.0), seed, stop)

    def request(self, body: dict) -> pb.GenerateRequest:
        """The Generate request with these parameters (no prompt yet)."""
        params = pb.SamplingParams(temperature=self.temperature,
                                   top_p=0.0 if self.top_p >= 1.0 else self.top_p)
        if self.seed is not None:
            params.seed = self.seed
        # ignore_eos: not OpenAI's, but vLLM's extra parameter, for benchmarks
        return pb.GenerateRequest(max_tokens=self.max_tokens, sampling=params,
                                  stop=self.stop, ignore_eos=body.get("ignore_eos") is True)


def chat_request(body: dict, default_max: int) -> pb.GenerateRequest:
    """/v1/chat/completions: the messages, as the entry node will template them."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str) for m in messages):
        raise ApiError(400, "messages must be a non-empty list of {role, content} with "
                            "text content", param="messages")
    request = Sampling.parse(body, default_max).request(body)
    request.messages.extend(pb.ChatMessage(role=m["role"], content=m["content"])
                            for m in messages)
    try:
        check_messages(request)
    except BadFrame as e:
        raise ApiError(400, str(e), param="messages") from None
    return request


def completion_request(body: dict, default_max: int) -> pb.GenerateRequest:
    """/v1/completions: the prompt text, tokenised by the entry node."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise ApiError(400, "prompt must be a non-empty string", param="prompt")
    request = Sampling.parse(body, default_max).request(body)
    request.prompt = prompt
    return request


def rpc_error(error: grpc.aio.AioRpcError, address: str, param: str) -> ApiError:
    """A failed Generate as the HTTP error a client expects."""
    code, details = error.code(), error.details() or ""
    if code == grpc.StatusCode.OUT_OF_RANGE:  # node.errors.ContextOverflow
        return ApiError(400, details, code="context_length_exceeded", param=param)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return ApiError(400, details)
    if code == grpc.StatusCode.UNAVAILABLE and "next shard" not in details:
        details = f"node {address} is unreachable ({details}); is it running?"
    else:
        details = f"node {address}: {code.name}: {details}"
    return ApiError(503, details, kind="server_error", code="cluster_error")


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def completion(rid: str, created: int, model: str, chat: bool, text: str, finish: str,
               counts: dict) -> dict:
    """A whole (non-streamed) answer."""
    choice = ({"index": 0, "message": {"role": "assistant", "content": text},
               "logprobs": None, "finish_reason": finish} if chat else
              {"index": 0, "text": text, "logprobs": None, "finish_reason": finish})
    return {"id": rid, "object": "chat.completion" if chat else "text_completion",
            "created": created, "model": model, "choices": [choice], "usage": counts}


def chunk(rid: str, created: int, model: str, chat: bool, text: str | None,
          finish: str | None, first: bool = False) -> dict:
    """One server-sent event of a streamed answer (`first`: the chat's role delta)."""
    if chat:
        delta = {"role": "assistant", "content": ""} if first else (
            {"content": text} if text else {})
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created, "model": model, "choices": [choice]}
