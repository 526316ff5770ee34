"""A multi-host test bed on one Linux machine, built from network namespaces.

The cluster tests on loopback cannot show what happens between machines: every node sees
the same interfaces, mDNS never leaves 127.0.0.1 and no address is ever unreachable.
`testbed(n)` gives each of n "hosts" its own network namespace with one interface,
`eth0`, plugged into a Linux bridge in the root namespace; the console runs in the root
namespace and reaches the nodes over the bridge (`bed.bridge_ip`). Multicast snooping is
off on the bridge so mDNS reaches every port.

Needs root, iproute2 and a kernel that allows namespaces; `unavailable()` says why not,
for a `pytest.mark.skipif`. The bed sends nothing beyond the namespaces it made and the
bridge address: the only root-namespace route is the bridge's own subnet, forwarding is
off on the bridge, and a subnet another interface or route already uses is refused.
Everything is removed on exit (an `atexit` hook covers a crashed run).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import ipaddress
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

_LIVE: dict[str, Bed] = {}  # prefix -> bed still open, for the atexit fallback


@functools.cache
def _ipcmd() -> str | None:
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin:/sbin:/usr/bin:/bin"
    return shutil.which("ip", path=path)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([_ipcmd() or "ip", *args], capture_output=True, text=True)
    if check and r.returncode:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")
    return r


@functools.cache
def unavailable() -> str | None:
    """None when network namespaces can be used here, else a sentence saying why not."""
    if not sys.platform.startswith("linux"):
        return f"network namespaces need Linux, this is {sys.platform}"
    if os.geteuid() != 0:
        return "network namespaces need root"
    if _ipcmd() is None:
        return "the ip command (iproute2) is not installed"
    probe = f"mcc-probe-{os.getpid()}-{time.monotonic_ns()}"
    r = _ip("netns", "add", probe, check=False)
    if r.returncode:
        return f"cannot create a network namespace: {r.stderr.strip() or r.returncode}"
    try:  # veth pairs and bridges, made inside the throwaway namespace only
        for kind in ("veth", "bridge"):
            r = _ip("-n", probe, "link", "add", "name", f"p{kind}", "type", kind, check=False)
            if r.returncode:
                return f"cannot create {kind} interfaces: {r.stderr.strip()}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


@dataclass
class Host:
    """One namespace: `popen` and `run` start commands inside it."""

    ns: str
    ip: str
    iface: str = "eth0"
    _procs: list[subprocess.Popen] = field(default_factory=list, repr=False)

    def argv(self, argv: Sequence[str | os.PathLike[str]]) -> list[str]:
        return [_ipcmd() or "ip", "netns", "exec", self.ns, *map(os.fspath, argv)]

    def popen(self, argv: Sequence[str | os.PathLike[str]], **kw) -> subprocess.Popen:
        """Start a process in this namespace, in a session of its own; the bed stops it."""
        kw.setdefault("start_new_session", True)
        proc = subprocess.Popen(self.argv(argv), **kw)
        self._procs.append(proc)
        return proc

    def run(self, argv: Sequence[str | os.PathLike[str]], **kw) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(argv), **kw)


@dataclass
class Bed:
    prefix: str
    subnet: ipaddress.IPv4Network
    bridge: str
    bridge_ip: str
    hosts: list[Host] = field(default_factory=list)
    procs: list[subprocess.Popen] = field(default_factory=list, repr=False)

    def _signal(self, proc: subprocess.Popen, sig: int) -> None:
        with contextlib.suppress(OSError):
            if proc.poll() is None and os.getpgid(proc.pid) == proc.pid:
                os.killpg(proc.pid, sig)
            elif proc.poll() is None:
                proc.send_signal(sig)

    def close(self) -> None:
        """Stop every process started here, then remove namespaces, veths and the bridge.
        Never raises over something already gone."""
        for proc in self.procs:
            self._signal(proc, signal.SIGTERM)
        deadline = time.monotonic() + 5
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.0, deadline - time.monotonic()))
            self._signal(proc, signal.SIGKILL)
        for host in self.hosts:  # anything left in the namespace, whatever its group
            pids = _ip("netns", "pids", host.ns, check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(OSError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        for i, host in enumerate(self.hosts):
            _ip("netns", "del", host.ns, check=False)
            _ip("link", "del", f"{self.prefix}v{i}", check=False)
        _ip("link", "del", self.bridge, check=False)
        _LIVE.pop(self.prefix, None)


def _clash(subnet: ipaddress.IPv4Network, prefix: str) -> str | None:
    for line in _ip("-o", "-4", "addr", "show").stdout.splitlines():
        parts = line.split()
        if ipaddress.ip_interface(parts[3]).network.overlaps(subnet):
            return f"{parts[1]} already has {parts[3]}, inside {subnet}"
    for line in _ip("-4", "route", "show", "table", "all").stdout.splitlines():
        dest = line.split()[0]
        if dest[0].isdigit() and ipaddress.ip_network(dest, strict=False).overlaps(subnet):
            return f"the route {line.strip()!r} already covers part of {subnet}"
    names = _ip("-o", "link", "show").stdout.split() + _ip("netns", "list").stdout.split()
    if any(name.strip(":").startswith(prefix) for name in names):
        return f"interfaces or namespaces named {prefix}* already exist"
    return None


@contextlib.contextmanager
def testbed(n: int = 3, prefix: str | None = None,
            subnet: str | ipaddress.IPv4Network = "10.77.0.0/24") -> Iterator[Bed]:
    """n namespaces `{prefix}{i}`, each with `eth0` at subnet .11+i on a bridge at .1."""
    if why := unavailable():
        raise RuntimeError(f"no network namespaces: {why}")
    net = ipaddress.IPv4Network(subnet)
    prefix = prefix if prefix is not None else f"mcc{os.getpid() % 100000}-"
    if len(f"{prefix}v{n - 1}") > 15 or len(f"{prefix}br") > 15:
        raise ValueError(f"prefix {prefix!r} makes interface names longer than 15 characters")
    if not 1 <= n <= net.num_addresses - 13:
        raise ValueError(f"{n} hosts do not fit in {net}")
    if why := _clash(net, prefix):
        raise RuntimeError(f"will not build a test bed on {net}: {why}")
    bed = Bed(prefix, net, f"{prefix}br", str(net.network_address + 1))
    _LIVE[prefix] = bed
    try:
        _ip("link", "add", bed.bridge, "type", "bridge", "mcast_snooping", "0")
        _ip("addr", "add", f"{bed.bridge_ip}/{net.prefixlen}", "dev", bed.bridge)
        # nothing that comes in from the namespaces is routed onwards
        sysctl = f"/proc/sys/net/ipv4/conf/{bed.bridge}/forwarding"
        with contextlib.suppress(OSError), open(sysctl, "w") as f:
            f.write("0")
        _ip("link", "set", bed.bridge, "multicast", "on", "up")
        for i in range(n):
            host = Host(f"{prefix}{i}", str(net.network_address + 11 + i), _procs=bed.procs)
            bed.hosts.append(host)
            veth = f"{prefix}v{i}"
            _ip("netns", "add", host.ns)
            _ip("link", "add", veth, "type", "veth", "peer", "name", host.iface,
                "netns", host.ns)
            _ip("link", "set", veth, "master", bed.bridge, "multicast", "on", "up")
            ns = ("-n", host.ns)
            _ip(*ns, "addr", "add", f"{host.ip}/{net.prefixlen}", "dev", host.iface)
            _ip(*ns, "link", "set", host.iface, "multicast", "on", "up")
            _ip(*ns, "link", "set", "lo", "up")
            # a default route on the link, so multicast (mDNS, 224.0.0.251) leaves by eth0
            _ip(*ns, "route", "add", "default", "dev", host.iface)
        yield bed
    finally:
        bed.close()


testbed.__test__ = False  # type: ignore[attr-defined]  # not a test, for all its name


@atexit.register
def _close_all() -> None:
    for bed in list(_LIVE.values()):
        with contextlib.suppress(Exception):
            bed.close()
