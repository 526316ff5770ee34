"""Cluster token and TLS: who may change a node.

Mutating RPCs (load, unload, fault injection, shutdown) and the Forward data plane need
the cluster token, sent as call metadata and compared in constant time by a server
interceptor; read-only RPCs (info, metrics, health, generate) stay open. The token comes
from --token, --token-file or the MLX_CLUSTER_TOKEN environment variable.
"""

from __future__ import annotations

import hmac
import os
from pathlib import Path

import grpc

TOKEN_METADATA_KEY = "x-mlx-cluster-token"
TOKEN_ENV = "MLX_CLUSTER_TOKEN"
SERVICE_PREFIX = "/mlxcluster.NodeService/"
MUTATING = frozenset({"LoadShard", "UnloadShard", "InjectFault", "HealFaults", "Shutdown",
                      "Forward", "RingWake", "Join", "Activate"})


def default_token_file() -> Path:
    """Where `mlx-cluster token new` keeps the cluster token: the user's config dir
    (~/.config/mlx-cluster-console/token on Linux; XDG_CONFIG_HOME moves it)."""
    from platformdirs import user_config_dir

    return Path(user_config_dir("mlx-cluster-console")) / "token"


def new_token(path: Path | None = None, force: bool = False) -> Path:
    """Make a strong token (256 random bits) and store it, readable by this user only."""
    import secrets

    path = path or default_token_file()
    if path.exists() and not force:
        raise FileExistsError(f"{path} already holds a token; --force replaces it (every "
                              "node and console then needs the new one)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(secrets.token_urlsafe(32) + "\n")
    os.chmod(path, 0o600)
    return path


def read_token(token: str | None = None, token_file: Path | str | None = None,
               default_file: bool = True) -> str | None:
    """The token from an explicit value, a file, the environment, or (`default_file`) the
    file `mlx-cluster token new` wrote, in that order."""
    if token:
        return token
    if not token_file and not os.environ.get(TOKEN_ENV) and default_file:
        found = default_token_file()
        token_file = found if found.is_file() else None
    if token_file:
        try:
            value = Path(token_file).expanduser().read_text().strip()
        except OSError as e:
            raise ValueError(f"cannot read token file {token_file}: {e.strerror}") from e
        if not value:
            raise ValueError(f"token file {token_file} is empty")
        return value
    return os.environ.get(TOKEN_ENV) or None


def token_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return ((TOKEN_METADATA_KEY, token),) if token else ()


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Rejects mutating calls whose metadata lacks the cluster token (UNAUTHENTICATED)."""

    def __init__(self, token: str) -> None:
        self._token = token.encode()

    def _allowed(self, details: grpc.HandlerCallDetails) -> bool:
        method = details.method
        if not method.startswith(SERVICE_PREFIX) or method[len(SERVICE_PREFIX):] not in MUTATING:
            return True
        given = dict(details.invocation_metadata or ()).get(TOKEN_METADATA_KEY, "")
        if isinstance(given, str):
            given = given.encode()
        return hmac.compare_digest(given, self._token)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or self._allowed(handler_call_details):
            return handler
        return _denying(handler, handler_call_details.method.rsplit("/", 1)[-1])


def _denying(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    message = (f"{method} needs the cluster token: pass --token/--token-file or set "
               f"{TOKEN_ENV}")

    async def deny_unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def deny_stream(request_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator

    kw = {"request_deserializer": handler.request_deserializer,
          "response_serializer": handler.response_serializer}
    if handler.stream_stream:
        return grpc.stream_stream_rpc_method_handler(deny_stream, **kw)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(deny_stream, **kw)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(deny_unary, **kw)
    return grpc.unary_unary_rpc_method_handler(deny_unary, **kw)


def server_credentials(cert: Path, key: Path) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials([(Path(key).read_bytes(), Path(cert).read_bytes())])


def channel_credentials(ca: Path | None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(Path(ca).read_bytes() if ca else None)


def open_channel(address: str, options: list, ca: Path | None = None,
                 tls: bool = False) -> grpc.aio.Channel:
    """An insecure channel, or a TLS one when a CA is given (or tls=True: system roots)."""
    if ca or tls:
        return grpc.aio.secure_channel(address, channel_credentials(ca), options=options)
    return grpc.aio.insecure_channel(address, options=options)


API_KEY_ENV = "MLX_CLUSTER_API_KEY"


LOCAL_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps a service to this machine's own clients: 127.0.0.1,
    ::1 or localhost, exactly. Every other address counts as the network, the wildcards
    ("0.0.0.0", "::") and even another loopback address such as 127.0.0.2 (which the tests
    use to stand for a LAN address): the rule stays simple to state and errs on the safe
    side."""
    return host in LOCAL_HOSTS


def bearer_matches(header: str, secret: str) -> bool:
    """Whether an HTTP Authorization header is `Bearer <secret>`, compared in constant
    time."""
    return hmac.compare_digest(header.encode(), f"Bearer {secret}".encode())
