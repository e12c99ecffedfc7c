"""`xpuserve convert`: rewrite a checkpoint once, offline, in the format it will be served in.

The model is built on the meta device in the target format; its load targets say what each
checkpoint tensor becomes (INT8 rows with per-row scales, or a float tensor of the model's
dtype), and the loader's own functions fill them, one tensor at a time. A converted
checkpoint therefore loads into exactly the values `load_model(SRC, quantization=...)` holds.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from xpuserve.config import CONVERT_TARGETS, ModelConfig
from xpuserve.models import build_model
from xpuserve.models.linear import WeightFormat
from xpuserve.quantization import int8
from xpuserve.weights.checkpoint import INDEX_FILE, Checkpoint, CheckpointError
from xpuserve.weights.loader import INT8_SCALE_SUFFIX, PROGRESS_BAR_BYTES, SCALE_SUFFIXES, expected_tensors, is_mtp, load_one

SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
SKIPPED_ENTRIES = (INDEX_FILE, "config.json", ".cache")  # .cache: huggingface_hub's notes on the source's files


@dataclass
class ConvertStats:
    tensors: int = 0
    int8_tensors: int = 0
    mtp_skipped: int = 0
    tied_skipped: int = 0
    nbytes: int = 0
    shards: list[str] = field(default_factory=list)
    copied: list[str] = field(default_factory=list)


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000 (decimal units as Hugging Face's, KiB/MiB/GiB binary), '1000' -> 1000."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match[2].upper() if match else None
    if unit not in SIZE_UNITS or float(match[1]) * SIZE_UNITS[unit] < 1:
        raise ValueError(f"shard size '{text}' is not a size like 5GB, 500MB or 1000000")
    return int(float(match[1]) * SIZE_UNITS[unit])


def convert_checkpoint(src: str | Path, dst: str | Path, to: str, max_shard_size: int) -> ConvertStats:
    """Write `src` converted to `to` (bf16 or int8) into the new or empty folder `dst`."""
    src, dst = Path(src), Path(dst)
    if to not in CONVERT_TARGETS:
        raise ValueError(f"cannot convert to '{to}'; use one of {', '.join(CONVERT_TARGETS)}")
    check_destination(src, dst)
    config = ModelConfig.from_pretrained(src)
    existed = dst.exists()
    dst.mkdir(parents=True, exist_ok=True)
    try:
        with Checkpoint(src) as ckpt:
            stats = write_tensors(ckpt, config, dst, to, max_shard_size)
        write_config(src, dst, to, drop_mtp=stats.mtp_skipped > 0)
        stats.copied = copy_other_files(src, dst)
    except BaseException:
        shutil.rmtree(dst, ignore_errors=True)  # no half-written checkpoint left behind
        if existed:
            dst.mkdir()
        raise
    return stats


def check_destination(src: Path, dst: Path) -> None:
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise FileExistsError(f"destination {dst} exists and is not empty; give a new folder")
    if dst.resolve().is_relative_to(src.resolve()):
        raise FileExistsError(f"destination {dst} is inside the source {src}; give a folder outside it")


def load_targets(config: ModelConfig, to: str) -> dict[str, object]:
    """Checkpoint name -> meta load target of the model in the served format."""
    fmt = WeightFormat("int8") if to == "int8" else WeightFormat()
    return expected_tensors(build_model(config, torch.bfloat16, "meta", fmt))


def write_tensors(ckpt: Checkpoint, config: ModelConfig, dst: Path, to: str, max_shard_size: int) -> ConvertStats:
    """Convert tensor by tensor, writing a shard whenever the next tensor would overflow it."""
    targets = load_targets(config, to)
    block = config.quantization.weight_block_size if config.quantization else None
    stats, shard = ConvertStats(), ShardWriter(dst, max_shard_size)
    bar = tqdm(ckpt.names(), desc=f"Converting to {to}", unit="tensor", disable=ckpt.nbytes() < PROGRESS_BAR_BYTES)
    for name in bar:
        if is_mtp(name, config.num_hidden_layers):
            stats.mtp_skipped += 1
            continue
        if any(name.endswith(s) and name[: -len(s)] in ckpt.file_of for s in SCALE_SUFFIXES):
            continue  # converted together with its weight
        if name == "lm_head.weight" and config.tie_word_embeddings:
            stats.tied_skipped += 1
            continue
        target = targets.pop(name, None)
        if target is None:
            raise CheckpointError(f"unexpected tensor '{name}' in {ckpt.dir / ckpt.file_of[name]}: "
                                  "no parameter of this architecture has that name (is config.json from the same model?)")
        converted = convert_tensor(ckpt, name, target, block)
        stats.int8_tensors += isinstance(target, int8.Int8Rows)
        stats.tensors += 1
        for out_name, tensor in converted.items():
            shard.add(out_name, tensor)
    if targets:
        missing = sorted(targets)
        raise CheckpointError(f"checkpoint {ckpt.dir} is missing {len(missing)} tensor(s): {', '.join(missing[:5])}")
    stats.shards, stats.nbytes = shard.finish(), shard.total_size
    return stats


def convert_tensor(ckpt: Checkpoint, name: str, target, block: tuple[int, int] | None) -> dict[str, torch.Tensor]:
    """One checkpoint tensor (with its scales) -> the tensors the converted checkpoint stores for it,
    loaded by the loader itself into a CPU copy of the model's target, so the values are the same."""
    if isinstance(target, int8.Int8Rows):
        rows = int8.Int8Rows(torch.empty(target.shape, dtype=torch.int8),
                             torch.empty(target.shape[:-1], dtype=torch.float32), target.via)
        load_one(ckpt, name, rows, block)
        return {name: rows.weight, name + INT8_SCALE_SUFFIX: rows.scale}
    if target.dtype == torch.float32 and ckpt.dtype(name) == torch.bfloat16:
        return {name: ckpt.get(name)}  # a float32 router loads bf16 exactly: no need to double it
    out = torch.empty(target.shape, dtype=target.dtype)
    load_one(ckpt, name, out, block)
    return {name: out}


class ShardWriter:
    """Collects tensors and writes a safetensors shard each time `max_size` bytes would be exceeded."""

    def __init__(self, dst: Path, max_size: int):
        self.dst, self.max_size = dst, max_size
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_size = self.total_size = 0
        self.files: list[str] = []
        self.weight_map: dict[str, str] = {}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_size + size > self.max_size:
            self.flush()
        self.pending[name] = tensor.contiguous()
        self.pending_size += size
        self.total_size += size

    def flush(self) -> None:
        file = f"part-{len(self.files) + 1:05d}.safetensors"  # renamed once the number of shards is known
        save_file(self.pending, self.dst / file, metadata={"format": "pt"})
        self.weight_map.update(dict.fromkeys(self.pending, file))
        self.files.append(file)
        self.pending, self.pending_size = {}, 0

    def finish(self) -> list[str]:
        """Writes the last shard, names them as Hugging Face does and writes the index; returns the names."""
        if self.pending or not self.files:
            self.flush()
        n = len(self.files)
        names = {f: "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
                 for i, f in enumerate(self.files, 1)}
        for old, new in names.items():
            (self.dst / old).rename(self.dst / new)
        if n > 1:
            weight_map = {t: names[f] for t, f in sorted(self.weight_map.items())}
            index = {"metadata": {"total_size": self.total_size}, "weight_map": weight_map}
            (self.dst / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return list(names.values())


def write_config(src: Path, dst: Path, to: str, drop_mtp: bool) -> None:
    """config.json as the converted checkpoint is: bf16, INT8-quantized or not, and without MTP layers."""
    raw = json.loads((src / "config.json").read_text())
    raw.pop("quantization_config", None)
    if to == "int8":
        raw["quantization_config"] = {"quant_method": "int8"}
    raw["torch_dtype"] = "bfloat16"
    if "dtype" in raw:  # newer transformers write `dtype`
        raw["dtype"] = "bfloat16"
    if drop_mtp and raw.get("num_nextn_predict_layers"):
        raw["num_nextn_predict_layers"] = 0
    (dst / "config.json").write_text(json.dumps(raw, indent=2) + "\n")


def copy_other_files(src: Path, dst: Path) -> list[str]:
    """Tokenizer, generation config, README...: everything but the weights and config.json."""
    copied = []
    for entry in sorted(src.iterdir()):
        if entry.name in SKIPPED_ENTRIES or entry.suffix == ".safetensors":
            continue
        if entry.is_dir():
            shutil.copytree(entry, dst / entry.name)
        else:
            shutil.copy2(entry, dst / entry.name)
        copied.append(entry.name)
    return copied
