"""DeepseekV2ForCausalLM and DeepseekV3ForCausalLM: MLA attention, DeepSeekMoE after the first dense layers.

V2 and V3 differ only in what config.json says (routing scheme, rope layout), so one class serves both.
"""

from xpuserve.config import ModelConfig
from xpuserve.models.decoder import CausalLM, DecoderLayer
from xpuserve.models.mla import MLAttention
from xpuserve.models.mlp import MLP
from xpuserve.models.moe import MoE


class DeepseekForCausalLM(CausalLM):
    def __init__(self, config: ModelConfig):
        layers = [
            DecoderLayer(
                config,
                MLAttention(config),
                MoE(config) if config.is_moe_layer(i) else MLP(config.hidden_size, config.intermediate_size),
            )
            for i in range(config.num_hidden_layers)
        ]
        super().__init__(config, layers, rope_dim=config.qk_rope_head_dim)
