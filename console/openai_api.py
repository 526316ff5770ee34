"""OpenAI's API shapes for the gateway (console/gateway.py): errors in OpenAI's JSON,
sampling parameters read and checked from a request body, stop strings cut from streamed
text, and the usage block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from aiohttp import web

from protos import cluster_pb2 as pb

MAX_STOP = 4  # as OpenAI's API


class ApiError(Exception):
    """An error for the client, in OpenAI's shape."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.code, self.param = status, kind, code, param

    def response(self) -> web.Response:
        return web.json_response({"error": {"message": str(self), "type": self.kind,
                                            "param": self.param, "code": self.code}},
                                 status=self.status)


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
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ApiError(400, "max_tokens must be a positive integer", param="max_tokens")
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)
                                 or not -2**63 <= seed < 2**63):
            raise ApiError(400, "seed must be a 64-bit integer", param="seed")
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(
                isinstance(s, str) and s for s in stop):
            raise ApiError(400, f"stop must be a string or up to {MAX_STOP} non-empty strings",
                           param="stop")
        return cls(max_tokens, number("temperature", 0.0, 0.0, 2.0),
                   number("top_p", 1.0, 0.0, 1.0), seed, stop)

    def proto(self) -> pb.SamplingParams:
        params = pb.SamplingParams(temperature=self.temperature,
                                   top_p=0.0 if self.top_p >= 1.0 else self.top_p)
        if self.seed is not None:
            params.seed = self.seed
        return params


class StopText:
    """Cuts the text at the first stop string; holds back what could begin one."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Text safe to send now."""
        if self.stopped:
            return ""
        self.pending += text
        cut = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0),
                  default=-1)
        if cut >= 0:
            self.stopped = True
            out, self.pending = self.pending[:cut], ""
            return out
        keep = max((k for s in self.stops for k in range(1, len(s))
                    if self.pending.endswith(s[:k])), default=0)
        out = self.pending[:len(self.pending) - keep]
        self.pending = self.pending[len(out):]
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}
