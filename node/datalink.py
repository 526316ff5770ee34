"""The data plane's own TCP link between neighbours: Forward frames without gRPC.

A hidden state took about 0.55 ms from the sender's request iterator to the receiver's
stream on a grpc.aio Forward stream on loopback, and 0.75 ms from the sender's pipeline to
the receiver's (tests/bench/pipeline_overhead.py's hop, 3 local nodes); here it takes
about 0.13 ms and 0.33-0.40 ms, most of it the wake-up of the idle receiving process. A frame is
one length-prefixed protobuf message (`ForwardFrame` one way, `ForwardReply` the
other) written straight to the socket, and read by an asyncio protocol in the callback
that receives the bytes. gRPC stays the control plane: a link learns the neighbour's data
port from its `GetInfo` (node/dataplane.py), and a node without one is reached by the
Forward RPC as before.

The same guarantees as the Forward RPC: one connection per link, so the frames of one
request arrive in order; the first message is a hello carrying the cluster token,
compared in constant time, and a node that has a token refuses a connection without it;
TLS with the node's certificate and the peers' CA when the node serves TLS; a receiver
with too many frames in hand stops reading, and TCP holds the rest on the sender's side.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import ssl
import struct
import time
from collections.abc import Callable
from pathlib import Path

from google.protobuf.message import DecodeError

from node.frames import FrameHandler, Frames, batched, unbatch
from node.metrics import NodeMetrics
from node.peers import MAX_MESSAGE_BYTES
from protos import cluster_pb2 as pb

log = logging.getLogger(__name__)

MAGIC = b"MLXD"
VERSION = 1
HELLO = struct.Struct("!4sBH")  # magic, version, token length; the token follows
LENGTH = struct.Struct("!I")  # every message after the hello: its length, then its bytes
HELLO_TIMEOUT_S = 5.0
REFUSED = "UNAUTHENTICATED"


def server_ssl(cert: Path, key: Path) -> ssl.SSLContext:
    """The data port's TLS: the node's own certificate, as its gRPC port serves it."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


def packed(message: pb.ForwardFrame | pb.ForwardReply) -> bytes:
    data = message.SerializeToString()
    return LENGTH.pack(len(data)) + data


class _Framed(asyncio.Protocol):
    """Length-prefixed messages in, each handed to `_message` as it completes (several of
    one read in one go: the frames of one batched forward stay together)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        start, error = 0, None
        view = memoryview(buffer)
        try:
            while len(buffer) - start >= LENGTH.size:
                size = LENGTH.unpack_from(buffer, start)[0]
                if size > MAX_MESSAGE_BYTES:
                    raise ValueError(f"a data-plane message of {size} bytes (at most "
                                     f"{MAX_MESSAGE_BYTES})")
                end = start + LENGTH.size + size
                if len(buffer) < end:
                    break
                self._message(view[start + LENGTH.size:end])
                start = end
                if self.transport is None or self.transport.is_closing():
                    break
        except (ValueError, DecodeError) as e:
            error = e
        finally:
            view.release()
        if error is None:
            try:
                del buffer[:start]
            except BufferError:  # a handler kept a view of a message: leave it that buffer
                self._buffer = bytearray(buffer[start:])
        else:  # (a view into the old buffer may live on in the error's traceback)
            self._buffer = bytearray()
            self._garbage(error)

    def _message(self, data: memoryview) -> None:
        raise NotImplementedError

    def _garbage(self, error: Exception) -> None:
        raise NotImplementedError


# ---------------------------------------------------------------- receiving side


class DataServer:
    """A node's data port: incoming links from its upstream neighbour (any number of
    them: each plan's link, and a restarted peer's new one beside its dying old one)."""

    def __init__(self, handle: FrameHandler, metrics: NodeMetrics, token: str | None,
                 tls: ssl.SSLContext | None = None) -> None:
        self._handle = handle
        self._metrics = metrics
        self._token = token.encode() if token else None
        self._tls = tls
        self._server: asyncio.Server | None = None
        self._links: set[_Incoming] = set()
        self.port = 0

    async def start(self, host: str, port: int = 0) -> int:
        """Listen on host:port (0: any free port); returns the port."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Incoming(self), host, port,
                                                ssl=self._tls, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            link.drop()


class _Incoming(_Framed):
    """One incoming link: the hello, then frames to the node's handler, errors back."""

    def __init__(self, server: DataServer) -> None:
        super().__init__()
        self._server = server
        self._frames: Frames | None = None  # set once the hello is accepted
        self._hello_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._server._links.add(self)
        self._hello_timer = asyncio.get_running_loop().call_later(HELLO_TIMEOUT_S, self.drop)

    def connection_lost(self, exc: Exception | None) -> None:
        self._server._links.discard(self)
        if self._hello_timer is not None:
            self._hello_timer.cancel()
        if self._frames is not None and exc is not None:
            # the link broke (the upstream is gone): its frames in hand are dropped, as a
            # broken Forward stream's are; on a clean close they are still handled
            self._frames.cancel()

    def drop(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def put_nowait(self, reply: pb.ForwardReply) -> None:
        """The replies queue the handler answers errors on (this link, backwards)."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(packed(reply))

    def _message(self, data: memoryview) -> None:
        if self._frames is None:
            raise ValueError("a data-plane message before the hello")
        metrics = self._server._metrics
        metrics.inc("forward_messages")
        arrived = time.time_ns()
        frames = unbatch(pb.ForwardFrame.FromString(data))
        if frames[0].sent_unix_ns:  # the hop up to here: building, writing, waking us up
            metrics.observe("hop_wire", max(0, arrived - frames[0].sent_unix_ns) / 1e9)
        for frame in frames:
            self._frames.take(frame)

    def data_received(self, data: bytes) -> None:
        if self._frames is None:
            self._buffer += data
            if not self._hello():
                return
            data, self._buffer = bytes(self._buffer), bytearray()
            if not data:
                return
        super().data_received(data)

    def _hello(self) -> bool:
        """Check the hello once it is complete; True when accepted."""
        buffer = self._buffer
        if len(buffer) < HELLO.size:
            return False
        magic, version, size = HELLO.unpack_from(buffer)
        if magic != MAGIC or version != VERSION:
            log.info("data port: not a data-plane link (or another version); closed")
            self.drop()
            return False
        if len(buffer) < HELLO.size + size:
            return False
        given = bytes(buffer[HELLO.size:HELLO.size + size])
        del buffer[:HELLO.size + size]
        if self._hello_timer is not None:
            self._hello_timer.cancel()
        expected = self._server._token
        if expected is not None and not hmac.compare_digest(given, expected):
            self._server._metrics.inc("data_links_refused")
            log.warning("data port: a link without the cluster token was refused")
            self.put_nowait(pb.ForwardReply(
                code=REFUSED, error="Forward needs the cluster token: pass --token/"
                "--token-file or set MLX_CLUSTER_TOKEN"))
            assert self.transport is not None
            self.transport.close()
            return False
        self.put_nowait(pb.ForwardReply())  # accepted
        self._server._metrics.inc("data_links")
        self._frames = Frames(self._server._handle, self, self._pause)
        return True

    def _pause(self, pause: bool) -> None:
        if self.transport is not None and not self.transport.is_closing():
            (self.transport.pause_reading if pause else self.transport.resume_reading)()

    def _garbage(self, error: Exception) -> None:
        """Undecodable bytes: the link cannot be trusted; the sender is told why."""
        log.info("data link ended: %r", error)
        self._server._metrics.inc("frames_rejected")
        self.put_nowait(pb.ForwardReply(code="INVALID_ARGUMENT",
                                        error=f"forward stream rejected: {error!r}"))
        if self._frames is not None:
            self._frames.cancel()
            self._frames = None
        if self.transport is not None:
            self.transport.close()


# ---------------------------------------------------------------- sending side


class Outgoing(_Framed):
    """The sending end of a link (node/dataplane.py's PeerLink drives it). Frames sent in
    one event-loop turn leave in one write, at the end of the turn."""

    def __init__(self, on_reply: Callable[[pb.ForwardReply], None],
                 on_end: Callable[[Outgoing, str], None]) -> None:
        super().__init__()
        self._on_reply = on_reply
        self._on_end = on_end
        loop = asyncio.get_running_loop()
        self._accepted: asyncio.Future = loop.create_future()
        self._ended: asyncio.Future = loop.create_future()  # the connection is gone
        self._live = False  # accepted, and handed to the caller of connect()
        self._out: list[pb.ForwardFrame] = []
        self._reason = "the next shard closed the data link"

    @classmethod
    async def connect(cls, host: str, port: int, token: str | None,
                      tls: ssl.SSLContext | None,
                      on_reply: Callable[[pb.ForwardReply], None],
                      on_end: Callable[[Outgoing, str], None],
                      timeout_s: float = HELLO_TIMEOUT_S) -> Outgoing:
        """Connect, say hello, and wait for the peer to accept it; raises on refusal."""
        loop = asyncio.get_running_loop()
        link = cls(on_reply, on_end)
        secret = (token or "").encode()
        transport, _ = await asyncio.wait_for(loop.create_connection(
            lambda: link, host, port, ssl=tls, server_hostname=host if tls else None),
            timeout_s)
        transport.write(HELLO.pack(MAGIC, VERSION, len(secret)) + secret)
        try:
            await asyncio.wait_for(link._accepted, timeout_s)
        except BaseException:
            transport.abort()
            raise
        link._live = True
        return link

    def send(self, frame: pb.ForwardFrame) -> None:
        if not self._out:
            asyncio.get_running_loop().call_soon(self._flush)
        self._out.append(frame)

    def _flush(self) -> None:
        frames, self._out = self._out, []
        if frames and self.transport is not None and not self.transport.is_closing():
            messages = batched(frames)  # one message, as the frames of one forward
            self.transport.write(packed(messages[0]) if len(messages) == 1 else
                                 b"".join(packed(m) for m in messages))

    def close(self) -> None:
        """Close once what was sent is written (the releases of a replaced plan). The
        callbacks are dropped at once: they hold the plan's pipeline (its weights), which
        must not outlive the plan until the connection is gone."""
        self._live = False
        self._flush()
        self._on_reply = _ignore
        self._on_end = _ignore
        if self.transport is not None:
            self.transport.close()

    async def wait_closed(self, timeout_s: float) -> None:
        await asyncio.wait([self._ended], timeout=timeout_s)

    def _message(self, data: memoryview) -> None:
        reply = pb.ForwardReply.FromString(data)
        if not self._accepted.done():
            if reply.code:
                self._accepted.set_exception(ConnectionRefusedError(
                    f"{reply.code}: {reply.error}"))
            else:
                self._accepted.set_result(None)
        elif reply.request_id:
            self._on_reply(reply)
        else:  # about the link itself: it ends next
            self._reason = f"{reply.code}: {reply.error}"

    def _garbage(self, error: Exception) -> None:
        self._reason = f"undecodable reply ({error!r})"
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        reason = self._reason if exc is None else f"{self._reason} ({exc!r})"
        self._ended.set_result(None)
        if not self._accepted.done():
            self._accepted.set_exception(ConnectionError(reason))  # connect() raises it
        elif self._live:
            self._live = False
            self._on_end(self, reason)


def _ignore(*args: object) -> None:
    """A closed link's callbacks."""
