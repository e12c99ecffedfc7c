"""Read tensors from a folder of safetensors files, single-file or sharded, memory-mapped."""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open

INDEX_FILE = "model.safetensors.index.json"
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and tensor."""


class Checkpoint:
    """Maps tensor name -> shard file, opens every shard lazily and reads one tensor at a time."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        self._handles: dict[str, object] = {}
        self._stack = ExitStack()
        self.file_of = self._tensor_files()

    def _tensor_files(self) -> dict[str, str]:
        index = self.dir / INDEX_FILE
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
            for file in sorted(set(weight_map.values())):
                if not (self.dir / file).exists():
                    raise CheckpointError(f"{index} lists shard {file}, which is missing from {self.dir}")
            return dict(weight_map)
        files = sorted(p.name for p in self.dir.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"no *.safetensors files in {self.dir}")
        file_of = {}
        for file in files:
            for name in self._open(file).keys():
                file_of[name] = file
        return file_of

    def _open(self, file: str):
        if file not in self._handles:
            try:
                self._handles[file] = self._stack.enter_context(safe_open(self.dir / file, framework="pt"))
            except Exception as e:  # safetensors raises its own error types for truncated or corrupt headers
                raise CheckpointError(f"cannot read shard {self.dir / file}: {e}{_cut_short(self.dir / file)}") from None
        return self._handles[file]

    def names(self) -> list[str]:
        """Tensor names grouped by shard, so shards are read one after another."""
        return sorted(self.file_of, key=lambda n: (self.file_of[n], n))

    def get(self, name: str) -> torch.Tensor:
        file = self.file_of[name]
        handle = self._open(file)
        try:
            return handle.get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"cannot read tensor '{name}' from {self.dir / file}: {e}") from None

    def get_slice(self, name: str, index: tuple[slice, ...]) -> torch.Tensor:
        """Part of a tensor; only its bytes are read from the file."""
        try:
            return self._open(self.file_of[name]).get_slice(name)[index]
        except Exception as e:
            raise CheckpointError(f"cannot read part {index} of tensor '{name}' from {self.dir / self.file_of[name]}: {e}") from None

    def shape(self, name: str) -> list[int]:
        return list(self._open(self.file_of[name]).get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        return SAFETENSORS_DTYPES[self._open(self.file_of[name]).get_slice(name).get_dtype()]

    def nbytes(self) -> int:
        return sum((self.dir / f).stat().st_size for f in set(self.file_of.values()))

    def close(self) -> None:
        self._stack.close()
        self._handles.clear()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _cut_short(path: Path) -> str:
    """For a truncated shard: which tensor the file ends in (the header gives every tensor's byte range)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        if 8 + header_len > size:
            return f" (the file ends inside its {header_len}-byte header)"
        try:
            header = json.loads(f.read(header_len))
        except ValueError:
            return ""
    data = size - 8 - header_len
    cut = sorted((t["data_offsets"], name) for name, t in header.items()
                 if name != "__metadata__" and isinstance(t, dict) and t.get("data_offsets", [0, 0])[1] > data)
    if not cut:
        return ""
    (start, end), name = cut[0]
    more = f", and {len(cut) - 1} tensor(s) after it" if len(cut) > 1 else ""
    return f" (truncated: the file ends at byte {data} of the data, inside tensor '{name}', bytes {start}-{end}{more})"
