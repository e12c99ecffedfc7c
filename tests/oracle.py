"""Random-weight checkpoints built with transformers' own classes, and the reference outputs.

transformers' default initialisation (std 0.02) makes every block nearly the identity, so a
wrong implementation could still match. Weights are re-drawn with a spread that makes every
block matter, routers decisive and the e_score_correction_bias random.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import transformers

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=3, max_position_embeddings=512)
MLA = dict(num_attention_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "beta_fast": 32,
        "beta_slow": 1, "mscale": 0.9, "mscale_all_dim": 0.7, "rope_theta": 10000.0}

# name -> (config class, model class, config kwargs)
ARCHITECTURES = {
    # V3: sigmoid noaux_tc, 4 groups of 4 experts, 2 groups chosen, first layer dense.
    "v3_grouped": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(
        TINY, **MLA, q_lora_rank=48, n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4,
        n_shared_experts=1, moe_intermediate_size=32, first_k_dense_replace=1, routed_scaling_factor=2.5)),
    # V3 with two dense layers and YaRN (mscale != mscale_all_dim, so both corrections matter).
    "v3_yarn_dense": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(
        TINY, **MLA, num_hidden_layers=4, q_lora_rank=48, n_routed_experts=8, n_group=2, topk_group=1,
        num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=32, first_k_dense_replace=2,
        routed_scaling_factor=1.5, rope_parameters=YARN)),
    # V2-Lite shape: no q_lora, softmax greedy routing, 2 shared experts, first layer dense.
    "v2_lite": ("DeepseekV2Config", "DeepseekV2ForCausalLM", dict(
        TINY, **MLA, q_lora_rank=None, n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=2,
        moe_intermediate_size=32, first_k_dense_replace=1, topk_method="greedy", norm_topk_prob=False)),
    # V2: group_limited_greedy over 4 groups.
    "v2_grouped": ("DeepseekV2Config", "DeepseekV2ForCausalLM", dict(
        TINY, **MLA, q_lora_rank=48, n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4,
        n_shared_experts=1, moe_intermediate_size=32, topk_method="group_limited_greedy",
        routed_scaling_factor=16.0, norm_topk_prob=False)),
    # R1-Distill-Qwen shape: GQA with q/k/v bias, untied head.
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        TINY, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)),
    # R1-Distill-Llama shape: GQA, llama3 rope scaling; tied embeddings to cover that path.
    "llama_tied": ("LlamaConfig", "LlamaForCausalLM", dict(
        TINY, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
        rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 64, "rope_theta": 10000.0})),
}


def spread_weights(model: torch.nn.Module, seed: int) -> None:
    """Re-draw every weight so each block changes its input substantially."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            elif "embed_tokens" in name:  # small next to block outputs, so a tied head does not just echo the input
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
            elif name.endswith("gate.weight"):  # router: large spread so expert choice is decisive
                p.copy_(torch.randn(p.shape, generator=gen) * 2.0 / math.sqrt(p.shape[-1]))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 1.0 / math.sqrt(p.shape[-1]))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.3 * torch.randn(b.shape, generator=gen))


def make_checkpoint(arch: str, path: Path, seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    """Build, re-draw and save a float32 checkpoint; returns the transformers model (eval mode)."""
    config_cls, model_cls, kwargs = ARCHITECTURES[arch]
    config = getattr(transformers, config_cls)(**{**kwargs, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    spread_weights(model, seed)
    model.save_pretrained(path)
    return model


def random_prompts(lengths: list[int], vocab: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]


@torch.no_grad()
def reference_logits(model, prompt: list[int]) -> torch.Tensor:
    return model(torch.tensor([prompt])).logits[0].float()


def write_char_tokenizer(path: Path, vocab_size: int) -> None:
    """A character-level tokenizer.json for a random checkpoint: token i is one printable character."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    chars = [chr(c) for c in range(0x21, 0x7F)] + [chr(c) for c in range(0xA1, 0x3000) if chr(c).isprintable()]
    vocab = {chars[i]: i for i in range(vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=chars[0]))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.save(str(path / "tokenizer.json"))


def write_reasoning_tokenizer(path: Path, vocab_size: int, think_end_id: int) -> None:
    """The character tokenizer plus R1's think tags as single (non-special, like R1's) tokens; `</think>`
    takes id `think_end_id`, so a model that emits that id closes its thought."""
    import json

    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    chars = [chr(c) for c in range(0x21, 0x7F)] + [chr(c) for c in range(0xA1, 0x3000) if chr(c).isprintable()]
    chars = [c for c in chars if c not in "<>/"][: vocab_size]
    chars[0], chars[think_end_id] = "<think>", "</think>"
    tokenizer = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token=chars[1]))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_tokens([AddedToken("<think>", special=False, normalized=False), AddedToken("</think>", special=False, normalized=False)])
    tokenizer.save(str(path / "tokenizer.json"))
    template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                "{% if add_generation_prompt %}<assistant><think>{% endif %}")
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))


STORIES = Path(__file__).resolve().parents[2] / "shared/models/stories260K"  # a real trained tiny Llama, shared data
