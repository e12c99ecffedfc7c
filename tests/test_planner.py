"""The cost and capacity planner: hand-computed costs of R1 and a dense distill, what fits where,
the CLI's table / JSON / chart, and the calibration against the engine's own decode on this machine."""

import argparse
import json
from pathlib import Path

import pytest

from xpuserve.config import ModelConfig
from xpuserve.planner.chips import load_chips
from xpuserve.planner.cli import add_planner_commands
from xpuserve.planner.cost import flops_per_token, kv_bytes_per_token, param_counts, total_params, weight_bytes
from xpuserve.planner.layout import Layout
from xpuserve.planner.models import BUILTIN_CONFIGS, resolve_model
from xpuserve.planner.plan import Options, Workload, plan, plan_layout, smallest_fit

SHARED_CONFIGS = Path(__file__).resolve().parents[2] / "shared" / "models" / "configs"
GB = 1e9

# DeepSeek-R1 by hand from config.json (61 layers, 3 dense, 58 MoE; MTP layer not counted).
H, V, R1_LAYERS = 7168, 129280, 61
R1_EMBED = V * H  # 926,679,040, and the same again for lm_head
R1_ATTN = H * 1536 + 1536 * 128 * 192 + H * (512 + 64) + 512 * 128 * (128 + 128) + 128 * 128 * H  # 187,105,280
R1_DENSE = 3 * H * 18432
R1_EXPERT = 3 * H * 2048
R1_ROUTED = 58 * 256 * R1_EXPERT
R1_NORMS = R1_LAYERS * (2 * H + 512 + 1536) + H
R1_ROUTER = 58 * 256 * H
R1_LINEAR = R1_LAYERS * R1_ATTN + 3 * R1_DENSE + 58 * R1_EXPERT + R1_ROUTED
R1_KEPT = 2 * R1_EMBED + R1_ROUTER + R1_NORMS  # stays bf16 in fp8 / int8
R1_PARAMS = R1_LINEAR + R1_KEPT


def r1() -> ModelConfig:
    return resolve_model("deepseek-r1")[1]


@pytest.mark.parametrize("name, file", [("deepseek-r1", "deepseek-r1.json"), ("deepseek-v2-lite", "deepseek-v2-lite.json")])
def test_builtin_configs_equal_the_published_ones(name, file):
    path = SHARED_CONFIGS / file
    if not path.is_file():
        pytest.skip(f"{path} is absent (shared data)")
    assert resolve_model(name)[1] == ModelConfig.from_pretrained_file(path)


def test_every_builtin_parses():
    for name in BUILTIN_CONFIGS:
        assert total_params(resolve_model(name)[1]) > 1e9


def test_r1_parameters_and_weight_bytes_by_hand():
    cfg = r1()
    assert R1_ATTN == 187_105_280
    assert total_params(cfg) == R1_PARAMS
    assert 670e9 < R1_PARAMS < 672e9  # DeepSeek: 671B
    assert param_counts(cfg)["routed_experts"] == R1_ROUTED
    assert weight_bytes(cfg, "bf16") == 2 * R1_PARAMS  # 1342.05 GB
    assert weight_bytes(cfg, "fp8") == R1_LINEAR + 2 * R1_KEPT  # 672.99 GB
    assert weight_bytes(cfg, "int8") == weight_bytes(cfg, "fp8") - R1_EMBED  # xpuserve's int8 quantizes lm_head too
    assert round(weight_bytes(cfg, "fp8") / GB, 1) == 673.0


def test_r1_latent_kv_bytes_per_token():
    cfg = r1()
    assert kv_bytes_per_token(cfg, "bf16") == 61 * (512 + 64) * 2 == 70_272
    assert kv_bytes_per_token(cfg, "fp8") == 61 * 576 == 35_136
    # what a per-head cache would have held: 128 heads x (192 key + 128 value) values
    assert 61 * 128 * (192 + 128) * 2 / kv_bytes_per_token(cfg, "bf16") > 70


def test_dense_flops_per_token_are_two_per_parameter():
    cfg = resolve_model("r1-distill-qwen-7b")[1]
    counts = param_counts(cfg)
    matmul_params = total_params(cfg) - counts["embed"] - counts["norms"]
    # attention over a cache of 0 tokens plus the new one: 2 FLOPs x (score + value) x heads x head_dim
    attn = 28 * 28 * 1 * 2 * 2 * 128
    assert flops_per_token(cfg, context=0) == 2 * matmul_params + attn
    assert flops_per_token(cfg, context=0) == pytest.approx(2 * total_params(cfg), rel=0.08)
    # attention grows with the context: 4096 cached tokens add 2 x 2 x 28 layers x 28 heads x 128 x 4096
    assert flops_per_token(cfg, 4096) - flops_per_token(cfg, 0) == 2 * 2 * 28 * 28 * 128 * 4096


def test_r1_moe_flops_count_only_active_experts():
    cfg = r1()
    active = R1_LAYERS * R1_ATTN + 3 * R1_DENSE + 58 * (R1_EXPERT + 8 * R1_EXPERT) + R1_EMBED + R1_ROUTER
    attn = 61 * 128 * 1 * 2 * (2 * 512 + 64)
    assert flops_per_token(cfg, 0) == 2 * active + attn
    assert 36e9 < active < 38e9  # DeepSeek: 37B activated


# One 8-chip node: usable HBM is 90%; TP8 puts 1/8 of the weights on each chip.
@pytest.mark.parametrize("chip, dtype, fits", [
    ("h200", "bf16", False),   # 1342 GB / 8 = 167.8 GB > 126.9 GB
    ("h200", "fp8", True),     # 673 GB / 8 = 84.1 GB < 126.9 GB, 42.8 GB left for the latent cache
    ("h800", "fp8", False),    # 84.1 GB > 72 GB
    ("h20", "fp8", False),     # 84.1 GB + 0.6 GB activations < 86.4 GB, but 1.7 GB < 2.8 GB of KV for 16 x 2500 tokens
    ("910c", "int8", True),    # 84.1 GB < 115.2 GB
    ("910c", "bf16", False),   # 167.8 GB > 115.2 GB
    ("910b", "int8", False),   # 84.1 GB > 57.6 GB
    ("910b", "fp8", False),    # no FP8 matmul
    ("a100", "int8", False),   # 84.1 GB > 72 GB
])
def test_r1_on_one_node(chip, dtype, fits):
    chips = load_chips()
    row = plan_layout(r1(), chips[chip], Layout(tp=8), Workload(), Options(dtype=dtype))
    assert row.fits is fits, row.reason
    expected_weights = weight_bytes(r1(), dtype) / 8 / GB
    assert row.weights_gb_per_chip == pytest.approx(expected_weights)
    if not fits:
        assert row.reason
    if chip == "910b" and dtype == "fp8":
        assert "FP8" in row.reason


@pytest.mark.parametrize("chip, dtype, smallest", [
    ("h200", "fp8", 8),
    ("h200", "bf16", 16),   # EP16: 13.6 GB non-routed bf16 + 1308 GB / 16 = 95.4 GB < 126.9 GB
    ("h800", "fp8", 16),    # EP16: 19.1 GB + 654 GB / 16 = 60.0 GB < 72 GB; TP8 needs 84.1 GB
    ("910c", "int8", 8),
    ("910b", "int8", 32),   # EP16 needs 60.0 GB + 1.4 GB activations > 57.6 GB; EP32 39.5 GB
    ("910b", "bf16", 64),   # EP32: 27.4 GB + 1308 GB / 32 = 68.2 GB > 57.6; EP64 47.8 GB
])
def test_r1_smallest_deployment(chip, dtype, smallest):
    cfg = r1()
    non_routed = weight_bytes(cfg, dtype) - R1_ROUTED * (2 if dtype == "bf16" else 1)
    rows = plan(cfg, [load_chips()[chip]], Workload(), Options(dtype=dtype))
    best = smallest_fit(rows, chip)
    assert best.unit_chips == smallest
    if best.layout.startswith("EP"):
        assert best.weights_gb_per_chip == pytest.approx((non_routed + R1_ROUTED * (2 if dtype == "bf16" else 1) / smallest) / GB)
    assert best.decode_tps_per_chip > 0 and best.tpot_ms <= 50


def test_cost_per_million_tokens_follows_price_and_throughput():
    chips = load_chips()
    cheap = plan_layout(r1(), chips["h200"], Layout(tp=8), Workload(), Options(dtype="fp8", prices={"h200": 1.0}))
    dear = plan_layout(r1(), chips["h200"], Layout(tp=8), Workload(), Options(dtype="fp8", prices={"h200": 2.0}))
    assert dear.usd_per_m_output == pytest.approx(2 * cheap.usd_per_m_output)
    assert cheap.usd_per_m_output == pytest.approx(1.0 / 3600 / cheap.decode_tps_per_chip * 1e6)
    hits = plan_layout(r1(), chips["h200"], Layout(tp=8), Workload(prefix_hit=0.5), Options(dtype="fp8"))
    assert hits.prefill_tps_per_chip > 1.5 * cheap.prefill_tps_per_chip


def test_user_chip_file(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('[mychip]\nname = "My chip"\nbf16_tflops = 100\nhbm_gb = 48\nhbm_gbps = 1000\nlink_gbps = 50\n'
                    'network_gbps = 25\nscaleup_chips = 8\nprice_per_hour = 0.5\nsource = "my bench"\n')
    chips = load_chips(path)
    assert chips["mychip"].hbm_gb == 48 and "h800" in chips
    assert all(c.source for c in chips.values())
    path.write_text('[bad]\nname = "x"\nteraflops = 3\n')
    with pytest.raises(ValueError, match="teraflops"):
        load_chips(path)


def run_plan(*argv: str, capsys) -> str:
    parser = argparse.ArgumentParser()
    add_planner_commands(parser.add_subparsers())
    args = parser.parse_args(["plan", *argv])
    args.func(args)
    return capsys.readouterr().out


def test_plan_table_json_and_chart(tmp_path, capsys):
    out = run_plan("deepseek-r1", "--chip", "h800", "--chip", "910b", "--dtype", "fp8", capsys=capsys)
    assert "h800" in out and "EP16" in out and "no FP8 matmul" in out
    data = json.loads(run_plan("deepseek-r1", "--chip", "h200", "--dtype", "fp8", "--concurrency", "4000", "--json",
                               capsys=capsys))
    best = data["summary"][0]
    assert best["fits"] and best["chips_needed"] % best["unit_chips"] == 0
    assert best["chips_needed"] * best["max_batch"] / best["unit_chips"] >= 4000
    png = tmp_path / "chart.png"
    run_plan("r1-distill-qwen-32b", "--chip", "h20", "--chip", "h100", "--chip", "910b", "--plot", str(png), capsys=capsys)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_chart_has_labelled_axes_and_a_bar_per_chip():
    from xpuserve.planner.report import chart, summary_rows

    work = Workload()
    rows = plan(resolve_model("r1-distill-qwen-7b")[1], [load_chips()[c] for c in ("h20", "a100", "910b")], work,
                Options(chips=1))
    shown = summary_rows(rows, work)
    fig = chart(shown, "test")
    throughput, cost = fig.axes
    assert "tokens/s" in throughput.get_ylabel() and "US$" in cost.get_ylabel()
    for ax in (throughput, cost):
        assert len(ax.patches) == 2 * len(shown)  # two bars (decode/prefill or output/input) per chip
        assert [t.get_text().split("\n")[0] for t in ax.get_xticklabels()] == [r.chip for r in shown]
        assert ax.get_xlabel()


def test_calibration_profile_is_sane_and_used_by_the_planner(tmp_path):
    """`xpuserve calibrate` on this CPU: every figure finite and positive, batch 16 decodes more
    tokens per second in total than batch 1, and the written profile is what the planner plans with.
    How close its predictions come to the engine is a benchmark's question (plan_vs_serve.py)."""
    pytest.importorskip("transformers")
    import math

    from xpuserve.planner.calibrate import PROMPT_LEN, calibrate, predicted_decode_tps, profile_toml
    from xpuserve.planner.chips import load_chips

    result = calibrate(workdir=str(tmp_path), rounds=1)
    chip = result.chip
    for name in ("bf16_tflops", "fp32_tflops", "hbm_gbps"):
        value = getattr(chip, name)
        assert math.isfinite(value) and value > 0, (name, value)
    assert chip.layer_overhead_us >= 0 and chip.expert_overhead_us >= 0
    assert "bf16 matmul: " in chip.source  # the kernel the rates were taken with
    for figures in (result.measured, result.predicted):
        assert set(figures) == {1, 16} and all(math.isfinite(v) and v > 0 for v in figures.values())
        assert figures[16] > figures[1]
    profile = tmp_path / "chips.toml"
    profile.write_text(profile_toml(chip))
    loaded = load_chips(profile)["cpu"]
    assert loaded.hbm_gbps == pytest.approx(chip.hbm_gbps, rel=1e-5) and loaded.source == chip.source
    # The planner's figures from the profile read back are the calibration's own predictions.
    for batch, tps in result.predicted.items():
        assert predicted_decode_tps(result.model, loaded, batch, PROMPT_LEN + 8 / 2) == pytest.approx(tps, rel=1e-4)
