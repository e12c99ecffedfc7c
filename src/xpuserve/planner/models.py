"""Built-in model configs, written from the public `config.json` of each Hugging Face release.

Only the fields the planner reads are kept; `ModelConfig.from_dict` parses them exactly as it
parses a checkpoint's own config, so a folder and a built-in name give the same numbers.
"""

from __future__ import annotations

from pathlib import Path

from xpuserve.config import ConfigError, ModelConfig

_YARN_V3 = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
            "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
_YARN_V2 = dict(_YARN_V3, mscale=0.707, mscale_all_dim=0.707)
_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}

# deepseek-ai/DeepSeek-R1 (same shapes as DeepSeek-V3 and V3-0324).
DEEPSEEK_R1 = {
    "architectures": ["DeepseekV3ForCausalLM"], "vocab_size": 129280, "hidden_size": 7168,
    "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
    "num_nextn_predict_layers": 1, "num_attention_heads": 128, "num_key_value_heads": 128,
    "n_shared_experts": 1, "n_routed_experts": 256, "routed_scaling_factor": 2.5, "kv_lora_rank": 512,
    "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128,
    "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4, "num_experts_per_tok": 8, "moe_layer_freq": 1,
    "first_k_dense_replace": 3, "norm_topk_prob": True, "scoring_func": "sigmoid", "hidden_act": "silu",
    "max_position_embeddings": 163840, "rms_norm_eps": 1e-06, "rope_theta": 10000, "rope_scaling": _YARN_V3,
    "attention_bias": False, "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 1,
    "torch_dtype": "bfloat16",
    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                            "weight_block_size": [128, 128]},
}
# deepseek-ai/DeepSeek-V2 (236B).
DEEPSEEK_V2 = {
    "architectures": ["DeepseekV2ForCausalLM"], "vocab_size": 102400, "hidden_size": 5120,
    "intermediate_size": 12288, "moe_intermediate_size": 1536, "num_hidden_layers": 60,
    "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 2, "n_routed_experts": 160,
    "routed_scaling_factor": 16.0, "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64,
    "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "group_limited_greedy", "n_group": 8,
    "topk_group": 3, "num_experts_per_tok": 6, "moe_layer_freq": 1, "first_k_dense_replace": 1,
    "norm_topk_prob": False, "scoring_func": "softmax", "hidden_act": "silu", "max_position_embeddings": 163840,
    "rms_norm_eps": 1e-06, "rope_theta": 10000, "rope_scaling": _YARN_V2, "attention_bias": False,
    "tie_word_embeddings": False, "bos_token_id": 100000, "eos_token_id": 100001, "torch_dtype": "bfloat16",
}
# deepseek-ai/DeepSeek-V2-Lite (15.7B): no q_lora, 64 experts, greedy routing.
DEEPSEEK_V2_LITE = {
    "architectures": ["DeepseekV2ForCausalLM"], "vocab_size": 102400, "hidden_size": 2048,
    "intermediate_size": 10944, "moe_intermediate_size": 1408, "num_hidden_layers": 27,
    "num_attention_heads": 16, "num_key_value_heads": 16, "n_shared_experts": 2, "n_routed_experts": 64,
    "routed_scaling_factor": 1.0, "kv_lora_rank": 512, "q_lora_rank": None, "qk_rope_head_dim": 64,
    "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "greedy", "n_group": 1, "topk_group": 1,
    "num_experts_per_tok": 6, "moe_layer_freq": 1, "first_k_dense_replace": 1, "norm_topk_prob": False,
    "scoring_func": "softmax", "hidden_act": "silu", "max_position_embeddings": 163840, "rms_norm_eps": 1e-06,
    "rope_theta": 10000, "rope_scaling": _YARN_V2, "attention_bias": False, "tie_word_embeddings": False,
    "bos_token_id": 100000, "eos_token_id": 100001, "torch_dtype": "bfloat16",
}


def _qwen2(vocab: int, hidden: int, inter: int, layers: int, heads: int, kv_heads: int, theta: float) -> dict:
    return {
        "architectures": ["Qwen2ForCausalLM"], "vocab_size": vocab, "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "max_position_embeddings": 131072, "rope_theta": theta,
        "rms_norm_eps": 1e-06, "tie_word_embeddings": False, "hidden_act": "silu", "bos_token_id": 151646,
        "eos_token_id": 151643, "torch_dtype": "bfloat16",
    }


def _llama(hidden: int, inter: int, layers: int, heads: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": 8, "max_position_embeddings": 131072, "rope_theta": 500000.0,
        "rope_scaling": _LLAMA3_ROPE, "rms_norm_eps": 1e-05, "tie_word_embeddings": False, "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False, "bos_token_id": 128000, "eos_token_id": 128001,
        "torch_dtype": "bfloat16",
    }


BUILTIN_CONFIGS: dict[str, dict] = {
    "deepseek-r1": DEEPSEEK_R1,
    "deepseek-v3": DEEPSEEK_R1,
    "deepseek-v2": DEEPSEEK_V2,
    "deepseek-v2-lite": DEEPSEEK_V2_LITE,
    "r1-distill-qwen-1.5b": _qwen2(151936, 1536, 8960, 28, 12, 2, 10000.0),
    "r1-distill-qwen-7b": _qwen2(152064, 3584, 18944, 28, 28, 4, 10000.0),
    "r1-distill-qwen-14b": _qwen2(152064, 5120, 13824, 48, 40, 8, 1000000.0),
    "r1-distill-qwen-32b": _qwen2(152064, 5120, 27648, 64, 40, 8, 1000000.0),
    "r1-distill-llama-8b": _llama(4096, 14336, 32, 32),
    "r1-distill-llama-70b": _llama(8192, 28672, 80, 64),
}


def resolve_model(name_or_dir: str) -> tuple[str, ModelConfig]:
    """A built-in name (case-insensitive) or a checkpoint folder -> (display name, config)."""
    key = name_or_dir.lower()
    if key in BUILTIN_CONFIGS:
        return key, ModelConfig.from_dict(BUILTIN_CONFIGS[key], source=f"built-in {key}")
    path = Path(name_or_dir)
    if path.is_dir():
        return path.name, ModelConfig.from_pretrained(path)
    raise ConfigError(
        f"'{name_or_dir}' is neither a checkpoint folder nor a built-in model; built-in: {', '.join(BUILTIN_CONFIGS)}"
    )
