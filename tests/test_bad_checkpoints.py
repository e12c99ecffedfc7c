"""Broken checkpoints and configs fail with an error that names what is wrong and where."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from oracle import make_checkpoint
from xpuserve.config import SUPPORTED_ARCHITECTURES, ConfigError
from xpuserve.weights import CheckpointError, load_model
from xpuserve.weights.checkpoint import INDEX_FILE

FILE = "model.safetensors"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("qwen2")
    make_checkpoint("qwen2", path)
    return path


@pytest.fixture
def ckpt(pristine, tmp_path) -> Path:
    for file in pristine.iterdir():
        (tmp_path / file.name).write_bytes(file.read_bytes())
    return tmp_path


def load(path: Path):
    return load_model(path, dtype="float32", device="cpu")


def edit_tensors(path: Path, edit) -> None:
    state = load_file(path / FILE)
    edit(state)
    save_file(state, path / FILE, metadata={"format": "pt"})


def edit_config(path: Path, edit) -> None:
    config = json.loads((path / "config.json").read_text())
    edit(config)
    (path / "config.json").write_text(json.dumps(config))


def test_pristine_checkpoint_loads(ckpt):
    load(ckpt)


def test_truncated_shard(ckpt, pristine):
    data = (ckpt / FILE).read_bytes()
    (ckpt / FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"cannot read shard .*{re.escape(str(ckpt / FILE))}") as error:
        load(ckpt)
    named = re.search(r"inside tensor '([^']+)'", str(error.value))  # the file names it, and the tensor too
    assert named and named.group(1) in load_file(pristine / FILE)


def test_missing_tensor(ckpt):
    name = "model.layers.1.self_attn.k_proj.bias"
    edit_tensors(ckpt, lambda state: state.pop(name))
    with pytest.raises(CheckpointError, match=rf"missing 1 tensor\(s\): {re.escape(name)}$"):
        load(ckpt)


def test_unexpected_tensor(ckpt):
    name = "model.layers.0.self_attn.rotary_emb.inv_freq"
    edit_tensors(ckpt, lambda state: state.update({name: torch.ones(8)}))
    with pytest.raises(CheckpointError, match=rf"unexpected tensor '{re.escape(name)}' in {re.escape(str(ckpt / FILE))}"):
        load(ckpt)


def test_wrong_shape(ckpt):
    name = "model.layers.2.mlp.down_proj.weight"
    edit_tensors(ckpt, lambda state: state.update({name: torch.zeros(64, 95)}))
    with pytest.raises(
        CheckpointError,
        match=rf"'{re.escape(name)}' in {re.escape(str(ckpt / FILE))} has shape \(64, 95\), the model expects \(64, 96\)",
    ):
        load(ckpt)


def test_index_lists_missing_shard(ckpt):
    names = list(load_file(ckpt / FILE))
    weight_map = {name: FILE for name in names}
    weight_map[names[-1]] = "model-00002-of-00002.safetensors"
    (ckpt / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=r"lists shard model-00002-of-00002\.safetensors, which is missing"):
        load(ckpt)


def test_unknown_architecture(ckpt):
    edit_config(ckpt, lambda config: config.update(architectures=["MixtralForCausalLM"]))
    supported = ", ".join(SUPPORTED_ARCHITECTURES)
    with pytest.raises(ConfigError, match=rf"MixtralForCausalLM.*not supported.*{re.escape(supported)}"):
        load(ckpt)


def test_missing_required_field(tmp_path):
    make_checkpoint("v3_grouped", tmp_path)
    edit_config(tmp_path, lambda config: config.pop("kv_lora_rank"))
    with pytest.raises(ConfigError, match=r"required field 'kv_lora_rank' is missing for DeepseekV3ForCausalLM"):
        load(tmp_path)
