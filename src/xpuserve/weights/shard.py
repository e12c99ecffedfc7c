"""Reading a rank's shard of a checkpoint tensor (models/shard.py says which part it holds).

Only the shard's bytes are read from the memory-mapped file (safetensors' get_slice). Served FP8
keeps the checkpoint's bytes; otherwise FP8 blocks around the shard are read and dequantized, then cut.
"""

from __future__ import annotations

import torch

from xpuserve.models.shard import Shard
from xpuserve.quantization import fp8, int8


def _index(dim: int, start: int, stop: int) -> tuple[slice, ...]:
    return (slice(None),) * dim + (slice(start, stop),)


def load_shard(ckpt, name: str, shard: Shard, block: tuple[int, int] | None, companion) -> None:
    """Read the shard of checkpoint tensor `name` (and of its scales) into `shard.target`.

    `companion(name, suffix)` reads a scale tensor that lies beside a quantized weight."""
    target, dim, start, stop = shard.target, shard.dim, shard.start, shard.stop
    dtype = ckpt.dtype(name)
    if dtype == torch.float8_e4m3fn:
        if block is None:
            raise ValueError("an fp8 tensor, but config.json has no quantization_config")
        scale_inv = companion(name, fp8.SCALE_SUFFIX)
        if isinstance(target, fp8.Fp8Rows) and _keep_fp8(ckpt, name, target, dim, start, stop, block, scale_inv):
            return
        target.copy_(_fp8_shard(ckpt, name, dim, start, stop, block, scale_inv))
        return
    tensor = ckpt.get_slice(name, _index(dim, start, stop))
    if tuple(tensor.shape) != tuple(target.shape):
        raise ValueError(f"shard {tuple(tensor.shape)} of the checkpoint tensor does not fit {tuple(target.shape)}")
    if dtype == torch.int8:
        scale = companion(name, "_scale")  # one per row: rows split with the weight, columns keep it
        int8.load_into(target, tensor, scale[start:stop] if dim == 0 else scale)
    else:
        target.copy_(tensor)


def _keep_fp8(ckpt, name, target: fp8.Fp8Rows, dim, start, stop, block, scale_inv) -> bool:
    """Served FP8 takes the checkpoint's bytes as they are: rows cut anywhere (its scales are per
    row), columns at 128-column block boundaries (R1's shards at TP8 all are). False otherwise."""
    if block[1] != fp8.COLUMN_BLOCK or (dim == 1 and start % block[1]):
        return False
    device = target.weight.device
    row_scales = scale_inv.repeat_interleave(block[0], dim=0)[: ckpt.shape(name)[0]]
    if dim == 0:
        target.weight.copy_(ckpt.get_slice(name, _index(0, start, stop)).to(device))
        target.scale_inv.copy_(row_scales[start:stop].to(device))
    else:
        target.weight.copy_(ckpt.get_slice(name, _index(1, start, stop)).to(device))
        target.scale_inv.copy_(row_scales[:, start // block[1] : -(-stop // block[1])].to(device))
    return True


def _fp8_shard(ckpt, name, dim, start, stop, block, scale_inv) -> torch.Tensor:
    """Dequantize the whole blocks around [start, stop) along `dim`, then cut the shard out."""
    size = block[dim]
    lo, hi = start // size * size, min(-(-stop // size) * size, ckpt.shape(name)[dim])
    weight = ckpt.get_slice(name, _index(dim, lo, hi))
    scales = scale_inv[_index(dim, lo // size, -(-hi // size))]
    full = fp8.dequantize(weight, scales, block)
    return full[_index(dim, start - lo, stop - lo)]
