"""Build the C++ kernels on first use, once per torch version and CPU, and register them as torch ops.

The binary is tuned to the CPU it is built on (-march=native), so the cache directory is keyed by
torch's version and the CPU's flags: ~/.cache/xpuserve/kernels/<key>/<library>/ (or under $XDG_CACHE_HOME).
Processes that start together share one build: torch holds a lock file in that directory meanwhile.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

NAME = "xpuserve_kernels"  # the library's name, and the namespace of its ops: torch.ops.xpuserve_kernels
SOURCES = [Path(__file__).parent / "csrc" / name for name in ("paged_attention.cpp", "kv_cache.cpp")]
# No -ffast-math: the kernels rely on -inf. -ffp-contract=fast fuses a * b + c into FMAs;
# -fopenmp makes at::parallel_for use threads (without it the header runs the loop serially).
CFLAGS = ["-O3", "-march=native" if platform.machine() in ("x86_64", "AMD64") else "-mcpu=native",
          "-ffp-contract=fast", "-fopenmp"]
# Longer than any build takes: a lock this old was left by a process killed while it built.
STALE_LOCK_S = 600

_status = "reference (not loaded yet)"


def cpu_key() -> str:
    """A name for what -march=native compiles for: the architecture and a hash of the CPU's flags."""
    flags = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), flags)
    except OSError:
        pass
    return f"{platform.machine()}-{hashlib.sha1(flags.encode()).hexdigest()[:12]}"


def cache_dir() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "xpuserve" / "kernels" / f"torch{torch.__version__}-{cpu_key()}"


@functools.cache
def load() -> bool:
    """Build the kernels or reuse the cached build, and load them; False, after one warning, where that fails."""
    global _status
    try:
        _status = f"C++ ({build_library(NAME, SOURCES)})"
    except BuildError as e:
        return _fall_back(str(e))
    return True


class BuildError(RuntimeError):
    """A C++ library could not be built or loaded; the message is the reason in one line."""


def build_library(name: str, sources: list[Path]) -> str:
    """Build the C++ library `name` from `sources` into cache_dir() / name (or reuse its cached build) and load it,
    which registers its ops as torch.ops.<name>.*. Returns 'built in X s' or 'cached'; raises BuildError."""
    start = time.perf_counter()
    compiler = os.environ.get("CXX", "c++")  # what torch's build runs
    if shutil.which(compiler) is None:
        raise BuildError(f"no C++ compiler ({compiler} not found)")
    try:
        # A directory per library: torch's lock is per directory, and a process that waited on it loads
        # without building, so a library sharing one could find another's build where its own should be.
        directory = cache_dir() / name
        directory.mkdir(parents=True, exist_ok=True)
        _clear_stale_lock(directory / "lock")
        binary = directory / f"{name}.so"
        before = binary.stat().st_mtime_ns if binary.exists() else None
        from torch.utils.cpp_extension import load as build

        build(name=name, sources=[str(s) for s in sources], extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"],
              is_python_module=False, build_directory=str(directory))
    except Exception as e:  # no headers, no ninja, a read-only cache: the reference still works
        raise BuildError(_reason(e)) from e
    built = before != binary.stat().st_mtime_ns
    return f"built in {time.perf_counter() - start:.1f} s" if built else "cached"


def kernel_status() -> str:
    """'C++ (built in X s)', 'C++ (cached)' or 'reference (why)'; builds the kernels if not done yet."""
    load()
    return _status


def _fall_back(reason: str) -> bool:
    global _status
    _status = f"reference ({reason})"
    log.warning("C++ kernels unavailable, using the PyTorch reference: %s", reason)
    return False


def _clear_stale_lock(lock: Path) -> None:
    try:
        if time.time() - lock.stat().st_mtime > STALE_LOCK_S:
            lock.unlink()
    except OSError:
        pass


def _reason(error: Exception) -> str:
    """The build error's most telling line: not ninja's or torch's framing, nor the command echoed."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    said = [line for line in lines if not line.startswith(("Error building extension", "FAILED:", "ninja:", "["))
            and " -c " not in line]
    line = next((line for line in said if "error" in line.lower()), (said or lines or [type(error).__name__])[0])
    return line if len(line) <= 200 else line[:197] + "..."
