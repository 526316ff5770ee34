"""What a node has to offer: memory, CPU, MLX device and BLAS, as GetInfo reports it."""

from __future__ import annotations

import platform
import re
from importlib.metadata import PackageNotFoundError, version

import psutil

from node.blas import blas_in_use
from node.plan import GIB

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2,
          "mib": 1024**2, "g": 1000**3, "gb": 1000**3, "gib": GIB, "t": 1000**4,
          "tb": 1000**4, "tib": 1024**4}


def parse_bytes(text: str) -> int:
    """Parse sizes such as '8GiB', '512 MB', '1.5g' or a plain byte count."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"not a size: {text!r} (try e.g. 8GiB, 512MB, 2000000000)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def default_memory_budget() -> int:
    """Available memory minus a safety margin (10% of total, at least 1 GiB)."""
    vm = psutil.virtual_memory()
    return max(0, int(vm.available - max(GIB, vm.total * 0.10)))


def _pkg_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def chip_name() -> str:
    """CPU model (Linux /proc/cpuinfo) or the platform's processor string."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def mlx_device() -> str:
    import mlx.core as mx

    return "gpu" if mx.default_device() == mx.gpu else "cpu"


def capabilities(memory_budget: int | None) -> dict:
    """A dict with the fields of the Capabilities proto message."""
    vm = psutil.virtual_memory()
    return {
        "platform": platform.platform(),
        "chip": chip_name(),
        "cpu_count": psutil.cpu_count() or 1,
        "memory_total": vm.total,
        "memory_available": vm.available,
        "memory_budget": memory_budget if memory_budget is not None else default_memory_budget(),
        "mlx_version": _pkg_version("mlx"),
        "mlx_device": mlx_device(),
        "blas": blas_in_use(),
        "mlx_lm_version": _pkg_version("mlx-lm"),
    }


def measure_matmul_gflops(size: int = 1024, seconds: float = 1.0) -> float:
    """fp32 matmul throughput of MLX's default device, for speed-weighted plans."""
    import time

    import mlx.core as mx

    a = mx.random.uniform(shape=(size, size))
    b = mx.random.uniform(shape=(size, size))
    mx.eval(a, b, a @ b)  # warm-up
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        mx.eval(a @ b)
        n += 1
    return 2 * size**3 * n / (time.perf_counter() - t0) / 1e9


def cached_calibration(state_dir, refresh: bool = False) -> float:
    """The measured GFLOP/s, cached in the state dir per MLX version, device and BLAS."""
    import json
    from pathlib import Path

    path = Path(state_dir) / "calibration.json"
    key = f"{_pkg_version('mlx')}/{mlx_device()}/{blas_in_use()}"
    try:
        cached = json.loads(path.read_text())
        if cached.get("key") == key and not refresh:
            return float(cached["matmul_gflops"])
    except (OSError, ValueError, KeyError):
        pass
    gflops = measure_matmul_gflops()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"key": key, "matmul_gflops": gflops}))
    return gflops
