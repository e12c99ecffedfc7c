"""Device families behind one small interface. The selected platform is the only global state."""

from __future__ import annotations

import torch

from xpuserve.platforms.base import Platform
from xpuserve.platforms.cpu import CpuPlatform
from xpuserve.platforms.cuda import CudaPlatform
from xpuserve.platforms.npu import NpuPlatform

class DeviceError(RuntimeError):
    """The requested device cannot be used; the message says why and what to do."""


PLATFORMS: dict[str, type[Platform]] = {"npu": NpuPlatform, "cuda": CudaPlatform, "cpu": CpuPlatform}
_current: Platform = CpuPlatform()


def current_platform() -> Platform:
    """The platform of the device the model was loaded on; its kernels serve every layer."""
    return _current


def resolve_device(device: str = "auto") -> tuple[Platform, torch.device]:
    """'auto' picks npu, then cuda, then cpu; 'cuda:1', 'npu:0', 'cpu' select explicitly."""
    global _current
    if device == "auto":
        device = next(k for k, p in PLATFORMS.items() if p.is_available())
    kind = device.split(":")[0]
    if kind not in PLATFORMS:
        raise DeviceError(f"unknown device '{device}'; use auto, cpu, cuda[:N] or npu[:N]")
    platform = PLATFORMS[kind]()
    if not platform.is_available():
        raise DeviceError(platform.unavailable_reason())
    index = device.partition(":")[2]
    if index and (not index.isdigit() or int(index) >= platform.device_count()):
        raise DeviceError(f"device '{device}' does not exist: this machine has {platform.device_count()} {kind} device(s)")
    _current = platform
    return platform, torch.device(device)
