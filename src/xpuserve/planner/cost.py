"""What a forward step of a model costs: weight parameters, matmul FLOPs, bytes read, KV bytes.

Everything here is arithmetic on `ModelConfig`; nothing depends on a chip. A step is described by
the matmuls it runs (`Matmul`: rows x [k, n] weight, `count` copies) plus attention over the cache.
The MTP layer of R1/V3 is not counted: it serves speculative decoding, not the main forward.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from xpuserve.config import ModelConfig

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1}
# Embedding, lm_head, router and norms stay in bf16 when the linear layers are fp8, as in DeepSeek's
# FP8 release; xpuserve's int8 quantizes the lm_head too. Scales (<0.1% of the bytes) are not counted.
UNQUANTIZED = ("embed", "lm_head", "router", "norms")
QUANTIZED_TOO = {"int8": ("lm_head",)}


@dataclass(frozen=True)
class Matmul:
    name: str
    rows: float  # activation rows multiplied by each weight matrix
    k: int  # input features
    n: int  # output features
    count: float = 1.0  # weight matrices of this shape (layers, busy experts, heads)
    dtype: str | None = None  # None: the plan's weight dtype; "fp32" for the router
    batched: bool = False  # one small matmul per head, run as a batched matmul (MLA's absorbed W_UK, W_UV)

    @property
    def params(self) -> float:
        return self.k * self.n * self.count

    @property
    def flops(self) -> float:
        return 2.0 * self.rows * self.params


@dataclass(frozen=True)
class Step:
    """One forward step on one chip."""

    matmuls: list[Matmul]
    attn_flops: float
    kv_bytes: float  # latent / KV cache read
    tokens: float  # new tokens this step
    seqs: float
    busy_experts: float  # per MoE layer on this chip (0 for dense models)


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Parameters by group; the groups in UNQUANTIZED stay bf16 in fp8/int8 checkpoints."""
    h, layers = cfg.hidden_size, cfg.num_hidden_layers
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(layers))
    dense_layers = layers - moe_layers
    counts = {
        "embed": cfg.vocab_size * h,
        "lm_head": 0 if cfg.tie_word_embeddings else cfg.vocab_size * h,
        "attention": layers * sum(m.params for m in attention_weights(cfg)),
        "dense_mlp": dense_layers * 3 * h * cfg.intermediate_size,
        "shared_experts": moe_layers * 3 * h * cfg.moe_intermediate_size * cfg.n_shared_experts,
        "routed_experts": moe_layers * 3 * h * cfg.moe_intermediate_size * (cfg.n_routed_experts or 0),
        "router": moe_layers * h * (cfg.n_routed_experts or 0),
        "norms": layers * 2 * h + h + layers * _attention_norms_and_biases(cfg),
    }
    return counts


def attention_weights(cfg: ModelConfig, rows: float = 0.0) -> list[Matmul]:
    """The attention projections of one layer (MLA's kv_b counted once, as W_UK and W_UV)."""
    h, heads = cfg.hidden_size, cfg.num_attention_heads
    if not cfg.is_mla:
        kv = cfg.num_key_value_heads * cfg.head_dim
        return [Matmul("q", rows, h, heads * cfg.head_dim), Matmul("kv", rows, h, 2 * kv),
                Matmul("o", rows, heads * cfg.head_dim, h)]
    r, rope = cfg.kv_lora_rank, cfg.qk_rope_head_dim
    q = ([Matmul("q", rows, h, heads * cfg.qk_head_dim)] if cfg.q_lora_rank is None else
         [Matmul("q_a", rows, h, cfg.q_lora_rank), Matmul("q_b", rows, cfg.q_lora_rank, heads * cfg.qk_head_dim)])
    return q + [
        Matmul("kv_a", rows, h, r + rope),
        Matmul("w_uk", rows, cfg.qk_nope_head_dim, r, count=heads, batched=True),
        Matmul("w_uv", rows, r, cfg.v_head_dim, count=heads, batched=True),
        Matmul("o", rows, heads * cfg.v_head_dim, h),
    ]


def _attention_norms_and_biases(cfg: ModelConfig) -> int:
    if cfg.is_mla:
        return cfg.kv_lora_rank + (cfg.q_lora_rank or 0)
    if cfg.qkv_bias:
        return (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim
    return 0


def total_params(cfg: ModelConfig) -> int:
    return sum(param_counts(cfg).values())


def weight_bytes(cfg: ModelConfig, dtype: str) -> float:
    """Bytes of the weights stored in `dtype` (linear layers) with the UNQUANTIZED groups in bf16."""
    counts = param_counts(cfg)
    kept = sum(counts[g] for g in UNQUANTIZED if g not in QUANTIZED_TOO.get(dtype, ()))
    return kept * BYTES["bf16"] + (sum(counts.values()) - kept) * BYTES[dtype]


def kv_bytes_per_token(cfg: ModelConfig, dtype: str) -> int:
    """Cache bytes per token over all layers: MLA keeps the latent and the rotary key only."""
    if cfg.is_mla:
        per_layer = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    else:
        per_layer = 2 * cfg.num_key_value_heads * cfg.head_dim
    return cfg.num_hidden_layers * per_layer * BYTES[dtype]


def busy_experts(num_experts: int, top_k: int, tokens: float) -> float:
    """Expected experts chosen by at least one of `tokens` tokens (uniform routing)."""
    if tokens <= 0:
        return 0.0
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** tokens)


def step_cost(
    cfg: ModelConfig,
    tokens: float,
    seqs: float,
    context: float,
    decode: bool,
    tp: int = 1,
    ep: int = 1,
    imbalance: float = 1.0,
    kv_dtype: str = "bf16",
) -> Step:
    """Cost on one chip of a step adding `tokens` tokens to `seqs` sequences whose cache holds `context` tokens.

    tp splits every weight `tp` ways (all chips see all tokens); ep > 1 means DP attention with the
    routed experts spread over `ep` chips, each chip bringing its own `tokens` (expert-parallel).
    Decode uses MLA's absorbed form; prefill the expanded one (kv_b applied to every cached latent).
    """
    layers = cfg.num_hidden_layers
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(layers))
    h = cfg.hidden_size
    mm: list[Matmul] = []
    for m in attention_weights(cfg, tokens):
        if cfg.is_mla and not decode and m.name in ("w_uk", "w_uv"):
            if m.name == "w_uk":  # expanded: kv_b on every cached latent of the chunk
                mm.append(Matmul("kv_b", context + tokens, cfg.kv_lora_rank,
                                 cfg.num_attention_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim)))
            continue
        mm.append(m)
    mm = [replace(m, count=m.count * layers) for m in mm]
    if layers - moe_layers:
        mm += [Matmul("mlp_gate_up", tokens, h, 2 * cfg.intermediate_size, layers - moe_layers),
               Matmul("mlp_down", tokens, cfg.intermediate_size, h, layers - moe_layers)]
    busy = 0.0
    if moe_layers:
        experts, k, inter = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size
        mm.append(Matmul("router", tokens, h, experts, moe_layers, dtype="fp32"))
        if cfg.n_shared_experts:
            shared = inter * cfg.n_shared_experts
            mm += [Matmul("shared_gate_up", tokens, h, 2 * shared, moe_layers),
                   Matmul("shared_down", tokens, shared, h, moe_layers)]
        # Tokens this chip's experts receive: its share of every chip's tokens, the hottest chip
        # getting `imbalance` times the mean.
        routed_rows = tokens * k * (imbalance if ep > 1 else 1.0)
        local_experts = experts / ep
        busy = local_experts * (1.0 - (1.0 - k / experts) ** (tokens * ep)) if tokens else 0.0
        per_expert = routed_rows / busy if busy else 0.0
        mm += [Matmul("expert_gate_up", per_expert, h, 2 * inter, busy * moe_layers),
               Matmul("expert_down", per_expert, inter, h, busy * moe_layers)]
    mm.append(Matmul("lm_head", seqs, h, cfg.vocab_size))
    if tp > 1:
        mm = [_shard(m, tp, cfg) for m in mm]
    attn_flops, kv = _attention(cfg, tokens, seqs, context, decode, kv_dtype)
    kv_shards = 1 if cfg.is_mla else min(tp, cfg.num_key_value_heads)  # MLA's latent is shared by all heads
    return Step(mm, attn_flops / tp, kv / kv_shards, tokens, seqs, busy)


def _shard(m: Matmul, tp: int, cfg: ModelConfig) -> Matmul:
    # Tensor parallelism: each chip holds 1/tp of every matrix (the router is replicated).
    if m.name == "router":
        return m
    return replace(m, count=m.count / tp)


def _attention(cfg: ModelConfig, tokens: float, seqs: float, context: float, decode: bool, kv_dtype: str):
    """(FLOPs, cache bytes read) of attention in all layers; `context` is the mean cached length."""
    layers, heads = cfg.num_hidden_layers, cfg.num_attention_heads
    if decode:
        keys = context + 1
        if cfg.is_mla:  # absorbed: multi-query attention over the latent (scores on R + rope, values on R)
            per_key = 2 * (2 * cfg.kv_lora_rank + cfg.qk_rope_head_dim)
        else:
            per_key = 2 * 2 * cfg.head_dim
        flops = layers * tokens * heads * keys * per_key
    else:
        # each new token attends to the cached prefix and, causally, half the chunk
        keys = context + tokens / (2 * max(seqs, 1))
        dims = (cfg.qk_head_dim + cfg.v_head_dim) if cfg.is_mla else 2 * cfg.head_dim
        flops = layers * tokens * heads * keys * 2 * dims
    kv = seqs * (context + tokens / max(seqs, 1)) * kv_bytes_per_token(cfg, kv_dtype)
    return flops, kv


def flops_per_token(cfg: ModelConfig, context: float = 0.0) -> float:
    """Forward FLOPs of one decode token at `context` cached tokens (lm_head included)."""
    step = step_cost(cfg, tokens=1, seqs=1, context=context, decode=True)
    return sum(m.flops for m in step.matmuls) + step.attn_flops


def usd_per_million(price_per_hour: float, tokens_per_second: float) -> float | None:
    """What a million tokens cost on hardware rented at `price_per_hour` that makes `tokens_per_second`
    (None when it makes none). The planner's and `xpuserve bench`'s cost lines both come from here."""
    return price_per_hour / 3600 / tokens_per_second * 1e6 if tokens_per_second > 0 else None
