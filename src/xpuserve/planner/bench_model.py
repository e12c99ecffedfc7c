"""The ~200M DeepSeek-V3-shaped random checkpoint used by benchmarks/throughput.py and calibration.

Built with transformers' own classes (a test dependency), so `xpuserve calibrate` needs it too.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models

CONFIG = dict(
    vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, first_k_dense_replace=1,
    num_attention_heads=16, num_key_value_heads=16, n_routed_experts=16, moe_intermediate_size=512,
    num_experts_per_tok=4, n_shared_experts=1, n_group=4, topk_group=2, q_lora_rank=384, kv_lora_rank=256,
    qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, max_position_embeddings=4096,
)
# Same layers, routing and expert count, negligible weights: its step time is the engine's fixed cost.
TINY_CONFIG = dict(
    CONFIG, vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_attention_heads=4,
    num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16,
)


def build_checkpoint(path: Path, config: dict | None = None):
    """Writes a bf16 checkpoint and a word-level tokenizer to `path`; returns the transformers model."""
    try:
        from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
    except ImportError:
        raise RuntimeError("building the benchmark model needs transformers: pip install 'xpuserve[test]'") from None
    config = config or CONFIG
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**config)).to(torch.bfloat16).eval()
    with torch.no_grad():  # a router that prefers some experts, as trained ones do
        for layer in model.model.layers[config["first_k_dense_replace"]:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.05)
    model.save_pretrained(path)
    write_tokenizer(path, config["vocab_size"])
    return model


def write_tokenizer(path: Path, vocab_size: int) -> None:
    vocab = {f"<{i}>": i for i in range(vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<0>"))
    tokenizer.decoder = decoders.Fuse()
    tokenizer.save(str(path / "tokenizer.json"))
