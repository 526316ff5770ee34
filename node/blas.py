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


def reexec_with_openblas() -> None:
    """Re-run this process with OpenBLAS preloaded, once; a no-op where it can't help."""
    lib = openblas_path()
    if not lib or lib in os.environ.get("LD_PRELOAD", "") or os.environ.get(_REEXEC_MARK):
        return
    if "mlx.core" in sys.modules:  # too late: the reference BLAS is already mapped
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
