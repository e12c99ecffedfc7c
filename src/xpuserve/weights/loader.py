"""Load a checkpoint into a model built by xpuserve.models, strictly.

The model declares the checkpoint tensors it expects (a view of its own storage for each);
every checkpoint tensor must fill exactly one of them. Tensors of multi-token-prediction
layers (index >= num_hidden_layers) are set aside; FP8 weights are dequantized block by block.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from xpuserve.config import ModelConfig
from xpuserve.models import build_model
from xpuserve.models.decoder import CausalLM
from xpuserve.platforms import resolve_device
from xpuserve.weights import fp8
from xpuserve.weights.checkpoint import Checkpoint, CheckpointError

log = logging.getLogger(__name__)
LAYER_INDEX = re.compile(r"^model\.layers\.(\d+)\.")
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
            if _is_mtp(name, config.num_hidden_layers):
                stats["mtp_skipped"] += 1
                continue
            if name.endswith(fp8.SCALE_SUFFIX) and name[: -len(fp8.SCALE_SUFFIX)] in ckpt.file_of:
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
            _load_one(ckpt, name, target, block)
            stats["loaded"] += 1
    if views:
        missing = sorted(views)
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"checkpoint {model_dir} is missing {len(missing)} tensor(s): {shown}")
    log.info("loaded %(loaded)d tensors, set aside %(mtp_skipped)d MTP tensors", stats)
    return stats


def _load_one(ckpt: Checkpoint, name: str, target: torch.Tensor, block: tuple[int, int] | None) -> None:
    where = ckpt.dir / ckpt.file_of[name]
    tensor = ckpt.get(name)
    if tuple(tensor.shape) != tuple(target.shape):
        raise CheckpointError(
            f"tensor '{name}' in {where} has shape {tuple(tensor.shape)}, the model expects {tuple(target.shape)}"
        )
    if tensor.dtype != torch.float8_e4m3fn:
        target.copy_(tensor)
        return
    scale_name = name + fp8.SCALE_SUFFIX
    if scale_name not in ckpt.file_of:
        raise CheckpointError(f"fp8 tensor '{name}' in {where} has no '{scale_name}' beside it")
    if block is None:
        raise CheckpointError(f"fp8 tensor '{name}' in {where}, but config.json has no quantization_config")
    try:
        fp8.dequantize_into(target, tensor.to(target.device), ckpt.get(scale_name).to(target.device), block)
    except ValueError as e:
        raise CheckpointError(f"tensor '{name}' in {where}: {e}") from None


def _is_mtp(name: str, num_layers: int) -> bool:
    match = LAYER_INDEX.match(name)
    return match is not None and int(match.group(1)) >= num_layers


def load_model(model_dir: str | Path, dtype: str | torch.dtype = "auto", device: str = "auto") -> CausalLM:
    """Parse config.json, build the model on the chosen device and fill it from the checkpoint."""
    config = ModelConfig.from_pretrained(model_dir)
    platform, torch_device = resolve_device(device)
    if dtype == "auto":
        dtype = platform.auto_dtype(config.torch_dtype)
    elif isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    model = build_model(config, dtype, torch_device)
    load_weights(model, model_dir)
    return model
