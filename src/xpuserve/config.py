"""Model configuration parsed from a Hugging Face `config.json`.

Only fields that change the math are kept. Names follow the checkpoint's own config so a
reader can match them one to one with `config.json`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = (
    "DeepseekV3ForCausalLM",
    "DeepseekV2ForCausalLM",
    "Qwen2ForCausalLM",
    "LlamaForCausalLM",
)
ROPE_TYPES = ("default", "linear", "yarn", "llama3")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
# Weight formats offered on the command line, here (no torch) so that parsing it stays quick.
QUANTIZATIONS = ("int8",)  # `--quantization`: converted on load
CONVERT_TARGETS = ("bf16", "int8")  # `xpuserve convert --to`


class ConfigError(ValueError):
    """A config.json that xpuserve cannot serve; the message says what and why."""


@dataclass
class RopeConfig:
    """Rotary embedding parameters (`rope_theta` plus `rope_scaling` / `rope_parameters`)."""

    rope_type: str = "default"
    theta: float = 10000.0
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    # YaRN
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True
    # llama3
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0


@dataclass
class QuantizationConfig:
    """`quantization_config` of a checkpoint; DeepSeek's FP8 release uses 128x128 blocks."""

    quant_method: str
    weight_block_size: tuple[int, int] | None = None
    fmt: str | None = None
    activation_scheme: str | None = None


@dataclass
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    rope: RopeConfig = field(default_factory=RopeConfig)
    # Biases. DeepSeek's `attention_bias` covers q_a/kv_a/o; Llama's covers q/k/v/o; Qwen2 has q/k/v bias.
    attention_bias: bool = False
    qkv_bias: bool = False
    mlp_bias: bool = False
    # MLA (DeepSeek). q_lora_rank is None for V2-Lite, which projects q directly.
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = True
    # DeepSeekMoE. n_routed_experts is None for dense models.
    n_routed_experts: int | None = None
    n_shared_experts: int = 0
    moe_intermediate_size: int = 0
    num_experts_per_tok: int = 0
    n_group: int = 1
    topk_group: int = 1
    topk_method: str = "greedy"
    scoring_func: str = "softmax"
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    num_nextn_predict_layers: int = 0
    quantization: QuantizationConfig | None = None
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    torch_dtype: str | None = None

    @property
    def is_mla(self) -> bool:
        return self.architecture in ("DeepseekV3ForCausalLM", "DeepseekV2ForCausalLM")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (
            self.n_routed_experts is not None
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> "ModelConfig":
        return cls.from_pretrained_file(Path(model_dir) / "config.json")

    @classmethod
    def from_pretrained_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path} not found: a model folder needs a Hugging Face config.json") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(raw).__name__}")
        _check_types(raw, source)
        try:
            return _parse(raw, source)
        except ConfigError:
            raise
        except (TypeError, ValueError, AttributeError, LookupError) as e:  # a nested field (rope_scaling, ...) of the wrong type
            raise ConfigError(f"{source}: a field has the wrong type ({type(e).__name__}: {e})") from None


# The JSON types of ModelConfig's plain fields, which config.json names the same.
_JSON_TYPES = {"int": (int,), "float": (int, float), "bool": (bool, int), "str": (str,)}


def _check_types(raw: dict[str, Any], source: str) -> None:
    for f in fields(ModelConfig):
        expected = _JSON_TYPES.get(f.type.removesuffix(" | None"))
        value = raw.get(f.name)
        if expected is None or value is None:
            continue
        if not isinstance(value, expected) or (isinstance(value, bool) and bool not in expected):
            kind = f.type.removesuffix(" | None")
            raise ConfigError(f"{source}: field '{f.name}' must be {kind}, got {type(value).__name__} {json.dumps(value)[:40]}")


def _parse(raw: dict[str, Any], source: str) -> ModelConfig:
    archs = raw.get("architectures") or []
    arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        raise ConfigError(
            f"{source}: architecture {archs or '(none given)'} is not supported; "
            f"xpuserve serves {', '.join(SUPPORTED_ARCHITECTURES)}"
        )

    def need(key: str) -> Any:
        if raw.get(key) is None:
            raise ConfigError(f"{source}: required field '{key}' is missing for {arch}")
        return raw[key]

    heads = need("num_attention_heads")
    hidden = need("hidden_size")
    eos = raw.get("eos_token_id")
    cfg = ModelConfig(
        architecture=arch,
        vocab_size=need("vocab_size"),
        hidden_size=hidden,
        intermediate_size=need("intermediate_size"),
        num_hidden_layers=need("num_hidden_layers"),
        num_attention_heads=heads,
        num_key_value_heads=raw.get("num_key_value_heads") or heads,
        head_dim=raw.get("head_dim") or hidden // heads,
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        max_position_embeddings=raw.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        hidden_act=raw.get("hidden_act", "silu"),
        rope=_parse_rope(raw, source),
        attention_bias=bool(raw.get("attention_bias", False)),
        mlp_bias=bool(raw.get("mlp_bias", False)),
        quantization=_parse_quantization(raw.get("quantization_config"), source),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
        torch_dtype=raw.get("torch_dtype") or raw.get("dtype"),
    )
    if cfg.hidden_act != "silu":
        raise ConfigError(f"{source}: hidden_act '{cfg.hidden_act}' is not supported; the R1 family uses 'silu'")
    if arch == "Qwen2ForCausalLM":
        cfg.qkv_bias = True
    elif arch == "LlamaForCausalLM":
        cfg.qkv_bias = cfg.attention_bias
    else:
        _parse_deepseek(cfg, raw, need, source)
    return cfg


def _parse_deepseek(cfg: ModelConfig, raw: dict[str, Any], need, source: str) -> None:
    cfg.q_lora_rank = raw.get("q_lora_rank")
    cfg.kv_lora_rank = need("kv_lora_rank")
    cfg.qk_nope_head_dim = need("qk_nope_head_dim")
    cfg.qk_rope_head_dim = need("qk_rope_head_dim")
    cfg.v_head_dim = need("v_head_dim")
    v3 = cfg.architecture == "DeepseekV3ForCausalLM"
    # V2 checkpoints always use DeepSeek's interleaved rope pairs; V3 lets config.json say so.
    cfg.rope_interleave = bool(raw.get("rope_interleave", True)) if v3 else True
    cfg.n_routed_experts = raw.get("n_routed_experts")
    cfg.num_nextn_predict_layers = raw.get("num_nextn_predict_layers", 0) or 0
    if cfg.n_routed_experts is None:
        return
    cfg.n_shared_experts = raw.get("n_shared_experts") or 0
    cfg.moe_intermediate_size = need("moe_intermediate_size")
    cfg.num_experts_per_tok = need("num_experts_per_tok")
    cfg.n_group = raw.get("n_group") or 1
    cfg.topk_group = raw.get("topk_group") or 1
    cfg.topk_method = raw.get("topk_method") or ("noaux_tc" if v3 else "greedy")
    cfg.scoring_func = raw.get("scoring_func") or ("sigmoid" if v3 else "softmax")
    cfg.norm_topk_prob = bool(raw.get("norm_topk_prob", v3))
    cfg.routed_scaling_factor = float(raw.get("routed_scaling_factor", 1.0))
    cfg.first_k_dense_replace = raw.get("first_k_dense_replace") or 0
    cfg.moe_layer_freq = raw.get("moe_layer_freq") or 1
    if cfg.topk_method not in TOPK_METHODS:
        raise ConfigError(f"{source}: topk_method '{cfg.topk_method}' is not supported; known: {', '.join(TOPK_METHODS)}")
    if cfg.scoring_func not in ("softmax", "sigmoid"):
        raise ConfigError(f"{source}: scoring_func '{cfg.scoring_func}' is not supported; known: softmax, sigmoid")
    if cfg.n_routed_experts % cfg.n_group:
        raise ConfigError(f"{source}: n_routed_experts {cfg.n_routed_experts} is not divisible by n_group {cfg.n_group}")


def _parse_rope(raw: dict[str, Any], source: str) -> RopeConfig:
    # Checkpoints write `rope_theta` + `rope_scaling`; transformers >= 5 writes `rope_parameters`.
    params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type not in ROPE_TYPES:
        raise ConfigError(f"{source}: rope type '{rope_type}' is not supported; known: {', '.join(ROPE_TYPES)}")
    rope = RopeConfig(
        rope_type=rope_type,
        theta=float(params.get("rope_theta", raw.get("rope_theta", 10000.0))),
        factor=float(params.get("factor") or 1.0),
        original_max_position_embeddings=params.get("original_max_position_embeddings"),
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        mscale=params.get("mscale"),
        mscale_all_dim=params.get("mscale_all_dim"),
        attention_factor=params.get("attention_factor"),
        truncate=bool(params.get("truncate", True)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
    )
    if rope_type in ("yarn", "llama3") and rope.original_max_position_embeddings is None:
        rope.original_max_position_embeddings = raw.get("max_position_embeddings", 4096)
    return rope


def _parse_quantization(raw: dict[str, Any] | None, source: str) -> QuantizationConfig | None:
    if not raw:
        return None
    method = raw.get("quant_method")
    if method == "int8":  # written by `xpuserve convert --to int8`
        return QuantizationConfig(quant_method=method)
    if method != "fp8":
        raise ConfigError(f"{source}: quantization '{method}' is not supported; xpuserve reads DeepSeek's block fp8 and its own int8")
    block = raw.get("weight_block_size")
    if block is None or len(block) != 2:
        raise ConfigError(f"{source}: fp8 quantization_config needs weight_block_size [rows, cols]")
    return QuantizationConfig(
        quant_method=method,
        weight_block_size=(int(block[0]), int(block[1])),
        fmt=raw.get("fmt"),
        activation_scheme=raw.get("activation_scheme"),
    )


@dataclass
class EngineConfig:
    """How to serve a model: vLLM's option names, with the same meanings."""

    model: str
    device: str = "auto"
    dtype: str = "auto"
    quantization: str | None = None  # "int8": INT8 weights (and activations where the platform has an INT8 matmul)
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    block_size: int = 16
    kv_cache_memory: int | None = None  # bytes for the KV cache; default: gpu_memory_utilization of free memory, 2 GiB on CPU
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    enable_prefix_caching: bool = True
    tensor_parallel_size: int = 1  # ranks (torchrun processes) the model is split across
    enable_expert_parallel: bool = False  # routed experts partitioned across the TP ranks instead of each split
    enforce_eager: bool | None = None  # True: decode eagerly; False: as a compiled graph; None: the platform's default

    def __post_init__(self) -> None:
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "tensor_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
