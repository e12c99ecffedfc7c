"""LlamaForCausalLM and Qwen2ForCausalLM (the R1-Distill models): GQA attention, dense SwiGLU."""

from xpuserve.config import ModelConfig
from xpuserve.models.decoder import CausalLM, DecoderLayer
from xpuserve.models.gqa import GQAttention
from xpuserve.models.mlp import MLP


class LlamaForCausalLM(CausalLM):
    def __init__(self, config: ModelConfig):
        layers = [
            DecoderLayer(config, GQAttention(config), MLP(config.hidden_size, config.intermediate_size, config.mlp_bias))
            for _ in range(config.num_hidden_layers)
        ]
        super().__init__(config, layers, rope_dim=config.head_dim)
