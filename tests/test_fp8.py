"""DeepSeek's block-FP8 checkpoints: exact dequantization on load, logits against transformers, MTP tensors."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from oracle import make_checkpoint, random_prompts, reference_logits
from xpuserve.config import ModelConfig
from xpuserve.generate import prompt_logits
from xpuserve.models import build_model
from xpuserve.weights import CheckpointError, load_model, load_weights
from xpuserve.quantization import fp8
from xpuserve.weights.checkpoint import INDEX_FILE
from xpuserve.weights.loader import expected_tensors

BLOCK = (128, 128)
QUANT_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(BLOCK)}
# Linear weights with dims that are not multiples of 128, several of them above 128.
ODD_SHAPES = dict(hidden_size=160, intermediate_size=200, moe_intermediate_size=72, q_lora_rank=136)
KEEP_FLOAT = ("model.embed_tokens.weight", "lm_head.weight", "mlp.gate.weight")
EXPERT = re.compile(r"(.*\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight")


def is_quantized(name: str, tensor: torch.Tensor) -> bool:
    return tensor.ndim == 2 and "norm" not in name and not name.endswith(KEEP_FLOAT)


def reference_dequantize(weight: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    rows, cols = weight.shape
    scale = scale_inv.repeat_interleave(BLOCK[0], dim=0)[:rows].repeat_interleave(BLOCK[1], dim=1)[:, :cols]
    return weight.float() * scale


def write_fp8_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """Quantizes the float checkpoint in `path` in place, in two shards; returns name -> dequantized reference."""
    state = load_file(path / "model.safetensors")
    (path / "model.safetensors").unlink()
    quantized, reference = {}, {}
    for name, tensor in state.items():
        if is_quantized(name, tensor):
            weight, scale_inv = fp8.quantize(tensor, BLOCK)
            quantized[name], quantized[name + fp8.SCALE_SUFFIX] = weight, scale_inv
            reference[name] = reference_dequantize(weight, scale_inv)
        else:
            quantized[name] = reference[name] = tensor
    write_shards(path, quantized)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = QUANT_CONFIG
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return reference


def write_shards(path: Path, state: dict[str, torch.Tensor]) -> None:
    """Alternates names between two shards, so a weight and its scale land in different files."""
    files = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    weight_map = {name: files[i % 2] for i, name in enumerate(sorted(state))}
    for file in files:
        save_file({n: state[n].contiguous() for n in state if weight_map[n] == file}, path / file, metadata={"format": "pt"})
    (path / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def fuse_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-expert checkpoint tensors -> transformers' stacked gate_up_proj / down_proj parameters."""
    fused, experts = {}, defaultdict(dict)
    for name, tensor in state.items():
        match = EXPERT.fullmatch(name)
        if match:
            experts[match[1]][int(match[2]), match[3]] = tensor
        else:
            fused[name] = tensor
    for prefix, parts in experts.items():
        ids = range(1 + max(e for e, _ in parts))
        fused[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat([parts[e, "gate"], parts[e, "up"]]) for e in ids])
        fused[f"{prefix}.down_proj"] = torch.stack([parts[e, "down"] for e in ids])
    return fused


@pytest.fixture(scope="module")
def fp8_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("v3_fp8")
    hf_model = make_checkpoint("v3_grouped", path, **ODD_SHAPES)
    reference = write_fp8_checkpoint(path)
    hf_model.load_state_dict(fuse_experts(reference), strict=True)
    return path, hf_model, reference


def test_quantize_round_trip():
    weight = torch.randn(300, 200, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 1, 200)
    q, scale_inv = fp8.quantize(weight, BLOCK)
    assert q.dtype == torch.float8_e4m3fn and q.shape == weight.shape
    assert scale_inv.dtype == torch.float32 and scale_inv.shape == (3, 2)
    restored = fp8.dequantize(q, scale_inv, BLOCK)
    assert torch.equal(restored, reference_dequantize(q, scale_inv))
    per_element_scale = reference_dequantize(torch.ones_like(weight).to(torch.float8_e4m3fn), scale_inv)
    # e4m3: 3 mantissa bits -> relative error <= 2^-4; subnormals (below 2^-6) have spacing 2^-9.
    bound = weight.abs() * (2**-4 + 1e-6) + per_element_scale * 2**-10
    assert ((restored - weight).abs() <= bound).all()
    assert q.float().abs().amax() == fp8.FP8_MAX


def test_fp8_checkpoint_has_odd_block_shapes(fp8_checkpoint):
    path, _, _ = fp8_checkpoint
    shards = [load_file(f) for f in sorted(path.glob("*.safetensors"))]
    fp8_shapes = {tuple(t.shape) for s in shards for t in s.values() if t.dtype == torch.float8_e4m3fn}
    assert any(r % 128 and r > 128 for r, _ in fp8_shapes) and any(c % 128 and c > 128 for _, c in fp8_shapes)
    index = json.loads((path / INDEX_FILE).read_text())["weight_map"]
    name = "model.layers.0.self_attn.q_a_proj.weight"
    assert index[name] != index[name + fp8.SCALE_SUFFIX]


def test_fp8_weights_load_bitwise(fp8_checkpoint):
    path, _, reference = fp8_checkpoint
    model = load_model(path, dtype="float32", device="cpu")
    views = expected_tensors(model)
    assert set(views) == set(reference)
    mismatched = [name for name, view in views.items() if not torch.equal(view, reference[name])]
    assert not mismatched


@pytest.mark.parametrize("lengths", [[1], [7, 33], [5, 64, 2]])
def test_fp8_logits_match_transformers(fp8_checkpoint, lengths):
    path, hf_model, _ = fp8_checkpoint
    model = load_model(path, dtype="float32", device="cpu")
    prompts = random_prompts(lengths, vocab=hf_model.config.vocab_size, seed=len(lengths))
    for prompt, logits in zip(prompts, prompt_logits(model, prompts)):
        expected = reference_logits(hf_model, prompt)
        assert (logits - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_wrong_scale_shape_names_tensor_and_file(fp8_checkpoint, tmp_path):
    path, _, _ = fp8_checkpoint
    for file in [*path.glob("*.safetensors"), path / INDEX_FILE, path / "config.json"]:
        (tmp_path / file.name).write_bytes(file.read_bytes())
    name = "model.layers.0.mlp.down_proj.weight"
    weight_map = json.loads((tmp_path / INDEX_FILE).read_text())["weight_map"]
    scale_file = tmp_path / weight_map[name + fp8.SCALE_SUFFIX]
    shard = load_file(scale_file)
    shard[name + fp8.SCALE_SUFFIX] = torch.ones(2, 1)
    save_file(shard, scale_file, metadata={"format": "pt"})
    where = re.escape(str(tmp_path / weight_map[name]))
    with pytest.raises(CheckpointError, match=rf"'{re.escape(name)}' in {where}: scale shape \(2, 1\)"):
        load_model(tmp_path, dtype="float32", device="cpu")


def add_mtp_layer(path: Path, num_layers: int) -> int:
    """Appends DeepSeek's multi-token-prediction layer as layer `num_layers`; returns how many tensors it adds."""
    state = load_file(path / "model.safetensors")
    source, target = f"model.layers.{num_layers - 1}.", f"model.layers.{num_layers}."
    mtp = {target + n[len(source):]: t.clone() for n, t in state.items() if n.startswith(source)}
    hidden = state["model.norm.weight"].shape[0]
    mtp[target + "eh_proj.weight"] = torch.randn(hidden, 2 * hidden)
    mtp[target + "enorm.weight"] = torch.ones(hidden)
    mtp[target + "hnorm.weight"] = torch.ones(hidden)
    mtp[target + "shared_head.norm.weight"] = torch.ones(hidden)
    save_file({**state, **mtp}, path / "model.safetensors", metadata={"format": "pt"})
    return len(mtp)


def test_mtp_layer_is_set_aside(tmp_path):
    hf_model = make_checkpoint("v3_grouped", tmp_path)
    num_layers = hf_model.config.num_hidden_layers
    num_tensors = len(load_file(tmp_path / "model.safetensors"))
    num_mtp = add_mtp_layer(tmp_path, num_layers)
    model = build_model(ModelConfig.from_pretrained(tmp_path), torch.float32, "cpu")
    stats = load_weights(model, tmp_path)
    assert stats == {"loaded": num_tensors, "mtp_skipped": num_mtp, "tied_skipped": 0}
    prompt = random_prompts([9], vocab=hf_model.config.vocab_size)[0]
    logits = prompt_logits(model, [prompt])[0]
    expected = reference_logits(hf_model, prompt)
    assert (logits - expected).abs().max() <= 1e-4 * expected.abs().max()
