"""The decoder stack every R1-family architecture shares: embed, N x (attention, MLP/MoE), norm, head."""

from __future__ import annotations

import torch
from torch import nn

from xpuserve.config import ModelConfig
from xpuserve.models.context import ForwardContext
from xpuserve.models.parallel import VocabParallelEmbedding, VocabParallelHead
from xpuserve.models.norm import RMSNorm
from xpuserve.models.rotary import RotaryEmbedding


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, self_attn: nn.Module, mlp: nn.Module):
        super().__init__()
        self.self_attn, self.mlp = self_attn, mlp
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, ctx: ForwardContext, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), ctx, rope)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, config: ModelConfig, layers: list[DecoderLayer]):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class CausalLM(nn.Module):
    """Parameter names match the Hugging Face checkpoints (`model.layers.3.self_attn...`)."""

    def __init__(self, config: ModelConfig, layers: list[DecoderLayer], rope_dim: int):
        super().__init__()
        self.config = config
        self.model = Backbone(config, layers)
        self.lm_head = None if config.tie_word_embeddings else VocabParallelHead(config.vocab_size, config.hidden_size, quantize=True)
        self.rotary = RotaryEmbedding(rope_dim, config.rope)

    def forward(self, input_ids: torch.Tensor, ctx: ForwardContext, layers: list | None = None) -> torch.Tensor:
        """input_ids [N] packed over the sequences of one step -> final hidden states [N, hidden].
        `layers`: callables standing in for the decoder layers (their compiled forms)."""
        rope = self.rotary(ctx.positions)
        x = self.model.embed_tokens(input_ids)
        for layer in layers or self.model.layers:
            x = layer(x, ctx, rope)
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over the whole vocabulary, on every rank."""
        return (self.model.embed_tokens if self.lm_head is None else self.lm_head).logits(hidden)

    def attention_layers(self) -> list[nn.Module]:
        return [layer.self_attn for layer in self.model.layers]
