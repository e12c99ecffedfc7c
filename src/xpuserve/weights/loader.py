"""Load a checkpoint into a model built by xpuserve.models, strictly.

The model declares the checkpoint tensors it expects (a view of its own storage for each);
every checkpoint tensor must fill exactly one of them. Tensors of multi-token-prediction
layers (index >= num_hidden_layers) are set aside. A quantized checkpoint tensor is read with
its scales beside it and loaded into whatever the model holds: FP8 kept as FP8, or dequantized
(into float, or straight to INT8) one block-row at a time.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from xpuserve.config import ModelConfig
from xpuserve.models.shard import OTHER_RANK, Shard
from xpuserve.weights.shard import load_shard
from xpuserve.models import build_model
from xpuserve.models.decoder import CausalLM
from xpuserve.platforms import resolve_device
from xpuserve.quantization import fp8, int8
from xpuserve.weights.checkpoint import Checkpoint, CheckpointError
from xpuserve.weights.format import choose_format

log = logging.getLogger(__name__)
LAYER_INDEX = re.compile(r"^model\.layers\.(\d+)\.")
INT8_SCALE_SUFFIX = "_scale"  # x.weight (int8) + x.weight_scale (float32, one per row)
SCALE_SUFFIXES = (fp8.SCALE_SUFFIX, INT8_SCALE_SUFFIX)
PROGRESS_BAR_BYTES = 1 << 30


def expected_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Checkpoint tensor name -> the view of the model's storage it loads into."""
    views: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if hasattr(module, "checkpoint_views"):
            views.update(module.checkpoint_views(name))
            continue
        prefix = f"{name}." if name else ""
        for pname, param in module.named_parameters(recurse=False):
            views[prefix + pname] = param.data
        for bname, buf in module.named_buffers(recurse=False):
            if buf is not None and bname not in module._non_persistent_buffers_set:
                views[prefix + bname] = buf
    return views


def load_weights(model: CausalLM, model_dir: str | Path) -> dict[str, int]:
    """Fill every parameter of `model` from the checkpoint in `model_dir`; returns counts for the log."""
    config = model.config
    views = expected_tensors(model)
    block = config.quantization.weight_block_size if config.quantization else None
    stats = {"loaded": 0, "mtp_skipped": 0, "tied_skipped": 0}
    with Checkpoint(model_dir) as ckpt:
        names = ckpt.names()
        bar = tqdm(names, desc="Loading weights", unit="tensor", disable=ckpt.nbytes() < PROGRESS_BAR_BYTES)
        for name in bar:
            if is_mtp(name, config.num_hidden_layers):
                stats["mtp_skipped"] += 1
                continue
            if any(name.endswith(s) and name[: -len(s)] in ckpt.file_of for s in SCALE_SUFFIXES):
                continue  # read together with its weight
            if name == "lm_head.weight" and config.tie_word_embeddings:
                stats["tied_skipped"] += 1
                continue
            target = views.pop(name, None)
            if target is None:
                raise CheckpointError(
                    f"unexpected tensor '{name}' in {ckpt.dir / ckpt.file_of[name]}: "
                    "no parameter of this architecture has that name (is config.json from the same model?)"
                )
            if target is OTHER_RANK:  # another rank's expert
                stats["other_ranks"] = stats.get("other_ranks", 0) + 1
                continue
            load_one(ckpt, name, target, block)
            stats["loaded"] += 1
    if views:
        missing = sorted(views)
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"checkpoint {model_dir} is missing {len(missing)} tensor(s): {shown}")
    log.info("loaded %(loaded)d tensors, set aside %(mtp_skipped)d MTP tensors", stats)
    return stats


def load_one(ckpt: Checkpoint, name: str, target, block: tuple[int, int] | None) -> None:
    """Copy one checkpoint tensor into its target: a tensor view, or an Int8Rows / Fp8Rows."""
    where = ckpt.dir / ckpt.file_of[name]
    if isinstance(target, Shard):  # this rank's part only
        try:
            load_shard(ckpt, name, target, block, lambda n, suffix: companion(ckpt, n, suffix))
        except CheckpointError:
            raise
        except (ValueError, RuntimeError) as e:
            raise CheckpointError(f"tensor '{name}' in {where}: {e}") from None
        return
    tensor = ckpt.get(name)
    if tuple(tensor.shape) != tuple(target.shape):
        raise CheckpointError(
            f"tensor '{name}' in {where} has shape {tuple(tensor.shape)}, the model expects {tuple(target.shape)}"
        )
    device = target.device
    try:
        if tensor.dtype == torch.int8:
            int8.load_into(target, tensor, companion(ckpt, name, INT8_SCALE_SUFFIX))
        elif tensor.dtype == torch.float8_e4m3fn:
            scale_inv = companion(ckpt, name, fp8.SCALE_SUFFIX).to(device)
            if block is None:
                raise CheckpointError(f"fp8 tensor '{name}' in {where}, but config.json has no quantization_config")
            if isinstance(target, fp8.Fp8Rows):
                target.load_fp8(tensor.to(device), scale_inv, block)
            else:
                fp8.dequantize_into(target, tensor.to(device), scale_inv, block)
        else:
            target.copy_(tensor)
    except (ValueError, RuntimeError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"tensor '{name}' in {where}: {e}") from None


def companion(ckpt: Checkpoint, name: str, suffix: str) -> torch.Tensor:
    if name + suffix not in ckpt.file_of:
        raise CheckpointError(f"{ckpt.dir / ckpt.file_of[name]}: quantized tensor '{name}' has no '{name + suffix}' beside it")
    return ckpt.get(name + suffix)


def is_mtp(name: str, num_layers: int) -> bool:
    match = LAYER_INDEX.match(name)
    return match is not None and int(match.group(1)) >= num_layers


def load_model(model_dir: str | Path, dtype: str | torch.dtype = "auto", device: str = "auto",
               quantization: str | None = None) -> CausalLM:
    """Parse config.json, choose the serving format, build the model on the device and fill it."""
    platform, torch_device = resolve_device(device)
    config = ModelConfig.from_pretrained(model_dir)
    fmt = choose_format(platform, config, dtype, quantization)
    log.info("serving format: %s", fmt.describe())
    model = build_model(config, fmt.dtype, torch_device, fmt.weights)
    load_weights(model, model_dir)
    model.serving_format = fmt
    return model
