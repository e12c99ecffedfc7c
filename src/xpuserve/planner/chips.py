"""Chip profiles: the shipped `chips.toml` plus any user file, read into plain dataclasses."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path

USER_FILE = Path(os.environ.get("XPUSERVE_CHIPS", Path.home() / ".config" / "xpuserve" / "chips.toml"))


@dataclass
class Chip:
    key: str
    name: str
    bf16_tflops: float
    hbm_gb: float
    hbm_gbps: float
    link_gbps: float
    network_gbps: float
    scaleup_chips: int
    price_per_hour: float
    source: str
    fp8_tflops: float | None = None
    int8_tops: float | None = None
    # CPUs without native bf16 (platforms/cpu.py): bf16 matmuls of at least bf16_upcast_rows rows
    # convert the weight to float32 (upcast_ns_per_param per weight) and multiply in float32
    # (fp32_tflops); a float32 copy too large for malloc to reuse has its pages faulted in afresh on
    # every call, at fresh_page_gbps. Fewer rows run the bf16 kernel at bf16_tflops.
    fp32_tflops: float | None = None
    bf16_upcast_rows: int | None = None
    upcast_ns_per_param: float | None = None
    fresh_page_gbps: float | None = None
    compute_efficiency: float = 0.6
    memory_efficiency: float = 0.8
    comm_efficiency: float = 0.7
    # Fixed costs of a step: kernel launches / Python per layer, and per busy expert where the
    # engine loops over experts instead of running one grouped GEMM.
    layer_overhead_us: float = 10.0
    expert_overhead_us: float = 0.0
    collective_latency_us: float = 15.0

    def matmul_tflops(self, dtype: str) -> float | None:
        """Peak rate of a matmul whose weights are `dtype`; None where the chip cannot run it."""
        if dtype == "fp8":
            return self.fp8_tflops
        if dtype == "int8":  # without an INT8 matmul: weight-only INT8, dequantised into bf16
            return self.int8_tops or self.bf16_tflops
        return self.bf16_tflops


def load_chips(extra: str | Path | None = None) -> dict[str, Chip]:
    """Shipped profiles, then the user file (XPUSERVE_CHIPS or ~/.config/xpuserve/chips.toml), then `extra`."""
    text = resources.files("xpuserve.planner").joinpath("chips.toml").read_text()
    chips = parse_chips(tomllib.loads(text), "chips.toml")
    for path in (USER_FILE, extra):
        if path is not None and Path(path).is_file():
            with open(path, "rb") as f:
                chips.update(parse_chips(tomllib.load(f), str(path)))
        elif path is extra and extra is not None:
            raise FileNotFoundError(f"chip file {extra} not found")
    return chips


def parse_chips(raw: dict, source: str) -> dict[str, Chip]:
    known = {f.name for f in fields(Chip)} - {"key"}
    chips = {}
    for key, table in raw.items():
        unknown = set(table) - known
        if unknown:
            raise ValueError(f"{source}: chip '{key}' has unknown field(s) {sorted(unknown)}; known: {sorted(known)}")
        try:
            chips[key] = Chip(key=key, **table)
        except TypeError as e:
            raise ValueError(f"{source}: chip '{key}': {e}") from None
    return chips
