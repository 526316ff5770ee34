"""Which BLAS MLX uses on the CPU, and how a process gets a fast one.

MLX's Linux CPU wheel links a reference BLAS (~6 GFLOP/s fp32 here). Preloading
Debian's OpenBLAS (`libopenblas0-pthread`) swaps in an optimised one (~400 GFLOP/s).
The dynamic loader only honours LD_PRELOAD at process start, so a process that
wants it re-executes itself once, before MLX is imported, with the variable set.
Set MLX_CLUSTER_NO_OPENBLAS=1 to opt out.

OpenBLAS worker threads busy-wait for ~2^28 cycles after each call before sleeping.
On a machine running several nodes (a local cluster) the idle nodes' spinning threads
steal the cores from the node that is computing: 3-node loopback pipeline decode of
SmolLM2 ran at ~0.63 of single-process speed with the default and ~0.8-0.9 with shorter
timeouts; 2^18 cycles, with the engine's per-layer async_eval, gave ~0.96-1.0
(tests/bench/pipeline_overhead.py, 2-core machine; single-process decode was not
slower with it). OPENBLAS_THREAD_TIMEOUT set by the user wins.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

OPENBLAS_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3",
)
_REEXEC_MARK = "MLX_CLUSTER_BLAS_REEXEC"
THREAD_TIMEOUT = "18"  # log2 of the cycles an idle OpenBLAS thread spins before sleeping


def openblas_path() -> str | None:
    """The OpenBLAS library to preload on this machine, if any."""
    if not sys.platform.startswith("linux") or os.environ.get("MLX_CLUSTER_NO_OPENBLAS"):
        return None
    return next((p for p in OPENBLAS_CANDIDATES if Path(p).exists()), None)


def openblas_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of `env` (default: os.environ) with OpenBLAS preloaded when available."""
    env = dict(os.environ if env is None else env)
    lib = openblas_path()
    if lib and lib not in env.get("LD_PRELOAD", ""):
        env["LD_PRELOAD"] = ":".join(p for p in (lib, env.get("LD_PRELOAD", "")) if p)
    if lib:
        env.setdefault("OPENBLAS_THREAD_TIMEOUT", THREAD_TIMEOUT)
    return env


def parse_cpus(text: str) -> set[int]:
    """`0-1`, `2,3` or `0-3,6`: CPU numbers this process may run on (Linux numbering, as
    taskset's --cpu-list)."""
    cpus: set[int] = set()
    try:
        for part in text.split(","):
            first, _, last = part.strip().partition("-")
            cpus.update(range(int(first), int(last or first) + 1))
    except ValueError:
        raise ValueError(f"--cpus {text!r}: give CPU numbers like 0-1 or 2,3") from None
    if not cpus:
        raise ValueError(f"--cpus {text!r}: no CPU named")
    if hasattr(os, "sched_getaffinity"):
        allowed = os.sched_getaffinity(0)
        if not cpus <= allowed:
            raise ValueError(f"--cpus {text}: this process may use CPUs "
                             f"{','.join(map(str, sorted(allowed)))} only")
    return cpus


def pin(cpus: set[int]) -> None:
    """Keep this process, its MLX thread and its BLAS threads on `cpus` (a node per core
    or two: one many-core host standing in for several machines). The affinity mask is
    inherited by every thread started after this and survives the re-exec below; BLAS
    reads its thread count from the environment when it loads, so the process re-executes
    once with it set (reexec_with_openblas). Linux only: elsewhere a warning."""
    if not hasattr(os, "sched_setaffinity"):
        print("mlx-node: --cpus works on Linux only; running unpinned", file=sys.stderr)
        return
    os.sched_setaffinity(0, cpus)
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        os.environ[name] = str(len(cpus))


def reexec_with_openblas(force: bool = False) -> None:
    """Re-run this process with OpenBLAS preloaded, once; a no-op where it can't help.
    `force`: re-run once even so (a pinned process: its BLAS reads the thread count then)."""
    lib = openblas_path()
    if os.environ.get(_REEXEC_MARK) or "mlx.core" in sys.modules:
        return  # done once already, or too late: a BLAS is already mapped
    if not force and (not lib or lib in os.environ.get("LD_PRELOAD", "")):
        return
    env = openblas_env()
    env[_REEXEC_MARK] = "1"
    argv = list(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))
    os.execve(sys.executable, [sys.executable, *argv[1:]], env)


def blas_in_use() -> str:
    """Name the BLAS mapped into this process: openblas, accelerate or reference."""
    if sys.platform == "darwin":
        return "accelerate"
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "unknown"
    # numpy's wheel maps its own libscipy_openblas64_, which MLX does not use
    libs = {line.rsplit(None, 1)[-1] for line in maps.splitlines() if "/" in line}
    if any("openblas" in lib and "scipy_openblas" not in lib for lib in libs):
        return "openblas"
    if "mkl" in maps:
        return "mkl"
    return "reference"
