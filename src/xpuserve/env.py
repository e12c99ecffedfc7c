"""`xpuserve env`: what a bug report needs to know about this machine, as text or JSON."""

from __future__ import annotations

import importlib
import importlib.util
import os
import platform as host
import sys
from pathlib import Path

import torch

import xpuserve
from xpuserve.config import ModelConfig
from xpuserve.platforms import PLATFORMS
from xpuserve.platforms.base import Platform
from xpuserve.platforms.cpu_features import detect
from xpuserve.weights.format import choose_format

# A DeepSeek-V3-shaped config.json, tiny: the serving format depends on the dtype and quantization only.
TINY_V3 = {"architectures": ["DeepseekV3ForCausalLM"], "vocab_size": 256, "hidden_size": 64, "intermediate_size": 96,
           "num_hidden_layers": 2, "num_attention_heads": 4, "kv_lora_rank": 32, "qk_nope_head_dim": 16,
           "qk_rope_head_dim": 8, "v_head_dim": 16, "torch_dtype": "bfloat16"}
CHECKPOINT_KINDS = {
    "bf16": {},
    "fp8": {"quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}},
    "int8": {"quantization_config": {"quant_method": "int8"}},
}
CANN_HOMES = ("/usr/local/Ascend/ascend-toolkit/latest", "/usr/local/Ascend/cann")
GIB = 1 << 30


def torch_build() -> str:
    if torch.version.cuda:
        return f"CUDA {torch.version.cuda}"
    if getattr(torch.version, "hip", None):
        return f"ROCm {torch.version.hip}"
    return "CPU"


def torch_npu_version() -> str:
    if importlib.util.find_spec("torch_npu") is None:
        return "not installed"
    try:
        return importlib.import_module("torch_npu").__version__
    except Exception as e:  # a torch_npu that cannot find CANN fails in its own ways
        return f"installed, but import fails: {type(e).__name__}: {e}"


def cann_version() -> str:
    """The toolkit's version=... line, from $ASCEND_TOOLKIT_HOME or the default install paths."""
    homes = [os.environ.get("ASCEND_TOOLKIT_HOME"), os.environ.get("ASCEND_HOME_PATH"), *CANN_HOMES]
    for home in filter(None, homes):
        info = Path(home) / f"{host.machine()}-linux" / "ascend_toolkit_install.info"
        try:
            lines = info.read_text().splitlines()
        except OSError:
            continue
        version = next((line.split("=", 1)[1].strip() for line in lines if line.startswith("version=")), "unknown")
        return f"{version} ({home})"
    return "not found"


def platform_info(cls: type[Platform]) -> dict:
    if not cls.is_available():
        return {"available": False, "reason": cls.unavailable_reason()}
    p = cls()
    devices = []
    for i in range(p.device_count()):
        device = p.device(i if p.name != "cpu" else None)
        memory = p.memory_info(device)
        devices.append({"name": p.device_name(device), "free_bytes": memory[0] if memory else None,
                        "total_bytes": memory[1] if memory else None})
    return {"available": True, "devices": devices,
            "supported_dtypes": [str(d).removeprefix("torch.") for d in p.supported_dtypes()],
            "matmul_kinds": sorted(p.matmul_kinds()), "int8_activations": p.int8_activations(),
            "dist_backend": p.dist_backend, "kernels": p.kernels()}


def cpu_info() -> dict:
    features = detect()
    return {"model": features.model, "instruction_sets": features.isa_names(), "aten_kernels": features.aten,
            "onednn_bf16": features.bf16_engine()}


def auto_choices() -> dict:
    """What `--device auto` picks, and the format `--dtype auto` serves each kind of checkpoint in."""
    name = next(k for k, cls in PLATFORMS.items() if cls.is_available())
    p = PLATFORMS[name]()
    formats = {kind: choose_format(p, ModelConfig.from_dict({**TINY_V3, **extra})).describe()
               for kind, extra in CHECKPOINT_KINDS.items()}
    return {"device": name, "formats": formats}


def collect() -> dict:
    return {
        "xpuserve": xpuserve.__version__,
        "python": sys.version.split()[0],
        "os": host.platform(),
        "torch": torch.__version__,
        "torch_build": torch_build(),
        "cpu": cpu_info(),
        "torch_npu": torch_npu_version(),
        "cann": cann_version(),
        "platforms": {name: platform_info(cls) for name, cls in PLATFORMS.items()},
        "auto": auto_choices(),
    }


def format_text(info: dict) -> str:
    lines = [f"{key}: {info[key]}" for key in ("xpuserve", "python", "os", "torch", "torch_build", "torch_npu", "cann")]
    cpu = info["cpu"]
    lines.append(f"cpu: {cpu['model']}; instruction sets: {', '.join(cpu['instruction_sets']) or 'none of note'}; "
                 f"ATen kernels: {cpu['aten_kernels']}; oneDNN bf16: {cpu['onednn_bf16']}")
    for name, p in info["platforms"].items():
        if not p["available"]:
            lines.append(f"{name}: not available: {p['reason']}")
            continue
        lines.append(f"{name}: available, {len(p['devices'])} device(s)")
        for i, d in enumerate(p["devices"]):
            memory = "host memory" if d["total_bytes"] is None else f"{d['free_bytes'] / GIB:.1f} GiB free of {d['total_bytes'] / GIB:.1f} GiB"
            lines.append(f"  [{i}] {d['name']}: {memory}")
        lines.append(f"  dtypes: {', '.join(p['supported_dtypes'])}; native matmuls: {', '.join(p['matmul_kinds']) or 'none'}")
        lines.append(f"  INT8 activations (W8A8): {'yes' if p['int8_activations'] else 'no'}; dist backend: {p['dist_backend']}")
        lines += [f"  kernel, {op}: {kernel}" for op, kernel in p["kernels"].items()]
    lines.append(f"--device auto: {info['auto']['device']}")
    for kind, fmt in info["auto"]["formats"].items():
        lines.append(f"--dtype auto, {kind} checkpoint: {fmt}")
    return "\n".join(lines)
