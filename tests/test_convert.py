"""`xpuserve convert`: a converted checkpoint loads into exactly what loading the source holds."""

from __future__ import annotations

import json

import pytest
import torch

from oracle import make_checkpoint, random_prompts, write_char_tokenizer
from test_fp8 import ODD_SHAPES, add_mtp_layer, write_fp8_checkpoint
from xpuserve.cli import main
from xpuserve.generate import prompt_logits
from xpuserve.quantization import int8
from xpuserve.weights import load_model
from xpuserve.weights.checkpoint import INDEX_FILE
from xpuserve.weights.convert import convert_checkpoint, parse_size
from xpuserve.weights.loader import expected_tensors

SMALL_SHARD = 200_000  # bytes: the tiny checkpoints below need several shards


@pytest.fixture(scope="module")
def fp8_source(tmp_path_factory):
    path = tmp_path_factory.mktemp("fp8_src")
    make_checkpoint("v3_grouped", path, **ODD_SHAPES)
    write_fp8_checkpoint(path)
    write_char_tokenizer(path, 256)
    (path / "generation_config.json").write_text(json.dumps({"temperature": 0.6}))
    return path


def assert_same_weights(model, reference) -> int:
    """Every load target bitwise equal; returns how many are INT8."""
    got, n_int8 = expected_tensors(model), 0
    for name, ref in expected_tensors(reference).items():
        target = got[name]
        if isinstance(ref, int8.Int8Rows):
            assert isinstance(target, int8.Int8Rows), name
            assert torch.equal(target.weight, ref.weight) and torch.equal(target.scale, ref.scale), name
            n_int8 += 1
        else:
            assert target.dtype == ref.dtype and torch.equal(target, ref), name
    assert set(got) == set(expected_tensors(reference))
    return n_int8


def assert_same_logits(model, reference) -> None:
    prompts = random_prompts([5, 17], model.config.vocab_size)
    for a, b in zip(prompt_logits(model, prompts), prompt_logits(reference, prompts)):
        assert torch.equal(a, b)


def test_fp8_to_int8_equals_int8_on_load(fp8_source, tmp_path):
    dst = tmp_path / "int8"
    stats = convert_checkpoint(fp8_source, dst, "int8", SMALL_SHARD)
    shards = sorted(dst.glob("*.safetensors"))
    assert len(shards) >= 2 and len(stats.shards) == len(shards)
    assert all(f.stat().st_size < SMALL_SHARD + 100_000 for f in shards)  # one tensor may overflow a shard
    assert set(json.loads((dst / INDEX_FILE).read_text())["weight_map"].values()) == {f.name for f in shards}
    config = json.loads((dst / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "int8"} and config["torch_dtype"] == "bfloat16"
    for name in ("tokenizer.json", "generation_config.json"):
        assert (dst / name).read_bytes() == (fp8_source / name).read_bytes()

    converted = load_model(dst, dtype="bfloat16", device="cpu")
    reference = load_model(fp8_source, dtype="bfloat16", device="cpu", quantization="int8")
    assert converted.serving_format.weights.kind == "int8"
    assert assert_same_weights(converted, reference) == stats.int8_tensors > 20
    assert_same_logits(converted, reference)


def test_fp8_to_bf16_equals_bf16_on_load(fp8_source, tmp_path):
    dst = tmp_path / "bf16"
    convert_checkpoint(fp8_source, dst, "bf16", SMALL_SHARD)
    config = json.loads((dst / "config.json").read_text())
    assert "quantization_config" not in config and config["torch_dtype"] == "bfloat16"
    assert not any(n.endswith("_scale_inv") for n in json.loads((dst / INDEX_FILE).read_text())["weight_map"])
    converted = load_model(dst, dtype="bfloat16", device="cpu")
    reference = load_model(fp8_source, dtype="bfloat16", device="cpu")
    assert assert_same_weights(converted, reference) == 0
    assert_same_logits(converted, reference)


def test_float32_gqa_to_int8_one_shard(tmp_path):
    make_checkpoint("qwen2", tmp_path / "src")
    stats = convert_checkpoint(tmp_path / "src", tmp_path / "dst", "int8", parse_size("5GB"))
    assert stats.shards == ["model.safetensors"] and not (tmp_path / "dst" / INDEX_FILE).exists()
    converted = load_model(tmp_path / "dst", dtype="bfloat16", device="cpu")
    reference = load_model(tmp_path / "src", dtype="bfloat16", device="cpu", quantization="int8")
    assert assert_same_weights(converted, reference) == stats.int8_tensors > 0
    assert_same_logits(converted, reference)


def test_mtp_layer_left_out(tmp_path):
    hf_model = make_checkpoint("v3_grouped", tmp_path / "src")
    n_mtp = add_mtp_layer(tmp_path / "src", hf_model.config.num_hidden_layers)
    stats = convert_checkpoint(tmp_path / "src", tmp_path / "dst", "bf16", parse_size("1MB"))
    assert stats.mtp_skipped == n_mtp
    load_model(tmp_path / "dst", dtype="bfloat16", device="cpu")


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("100KiB") == 102400 and parse_size("1000") == 1000
    with pytest.raises(ValueError, match="not a size"):
        parse_size("5 parsecs")


def test_cli_convert_and_refusals(fp8_source, tmp_path, capsys):
    dst = tmp_path / "dst"
    assert main(["convert", str(fp8_source), str(dst), "--to", "int8", "--max-shard-size", "300KB"]) == 0
    assert "shard(s)" in capsys.readouterr().out
    assert main(["convert", str(fp8_source), str(dst), "--to", "bf16"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not empty" in err

    (tmp_path / "empty").mkdir()
    assert main(["convert", str(tmp_path / "empty"), str(tmp_path / "out"), "--to", "bf16"]) == 2
    assert "config.json" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
