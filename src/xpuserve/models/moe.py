"""DeepSeekMoE: a router choosing top-k routed experts per token, plus always-on shared experts."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from xpuserve.config import ModelConfig
from xpuserve.models.linear import current_weight_format, matmul, quantized_weight, weight_rows
from xpuserve.distributed import all_reduce, parallel_state
from xpuserve.models.shard import OTHER_RANK, shard
from xpuserve.models.mlp import MLP
from xpuserve.models.parallel import rank_range
from xpuserve.platforms import current_platform


class Router(nn.Module):
    """Chooses experts and their weights. Three schemes, as the checkpoints define them:

    - V2 `greedy`: softmax scores, plain top-k.
    - V2 `group_limited_greedy`: softmax scores, top-k within the topk_group groups whose best
      expert scores highest.
    - V3 `noaux_tc`: sigmoid scores; experts are *chosen* by score + e_score_correction_bias
      within the topk_group groups with the highest sum of their top-2 biased scores, but
      *weighted* by the unbiased scores.
    V3 normalises the chosen weights (if norm_topk_prob) and then scales by routed_scaling_factor;
    V2 does one or the other, as DeepSeek's V2 code does.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.n_group, self.topk_group = config.n_group, config.topk_group
        self.method, self.scoring = config.topk_method, config.scoring_func
        self.norm_topk_prob, self.scaling = config.norm_topk_prob, config.routed_scaling_factor
        # Routing runs in float32 whatever the model dtype, as in the reference implementations.
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size, dtype=torch.float32))
        if self.method == "noaux_tc":
            self.register_buffer("e_score_correction_bias", torch.empty(config.n_routed_experts, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, hidden] -> (weights [N, k] float32, expert ids [N, k])"""
        logits = F.linear(x.float(), self.weight)
        scores = logits.sigmoid() if self.scoring == "sigmoid" else logits.softmax(dim=-1)
        choice = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias
        if self.method != "greedy" and self.n_group > 1:
            choice = self._limit_to_groups(choice)
        ids = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, ids)
        if self.method == "noaux_tc":
            if self.norm_topk_prob:
                weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
            weights = weights * self.scaling
        elif self.top_k > 1 and self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        else:
            weights = weights * self.scaling
        return weights, ids

    def _limit_to_groups(self, choice: torch.Tensor) -> torch.Tensor:
        grouped = choice.view(choice.shape[0], self.n_group, -1)
        if self.method == "noaux_tc":
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
        else:
            group_scores = grouped.amax(dim=-1)
        best = group_scores.topk(self.topk_group, dim=-1).indices
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
        return grouped.masked_fill(~keep[:, :, None], float("-inf")).view_as(choice)


class Experts(nn.Module):
    """The routed experts of a layer this rank holds, stacked: w13 = [gate; up] per expert, w2 = down.

    Across ranks, either each rank holds whole experts, a contiguous 1/N of them (expert
    parallel), or every expert with 1/N of its intermediate features (tensor parallel). Either
    way every rank holds all tokens (attention all-reduced them), so dispatch costs nothing: each
    rank runs its share on the tokens routed to it, and the caller's one all-reduce combines.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        state = parallel_state()
        self.expert_parallel = state.expert_parallel and state.distributed
        self.expert_range = rank_range(num_experts, "n_routed_experts") if self.expert_parallel else (0, num_experts)
        self.feature_range = (0, intermediate_size) if self.expert_parallel else rank_range(intermediate_size, "moe_intermediate_size")
        (first, stop), (lo, hi) = self.expert_range, self.feature_range
        local_experts, inter = stop - first, hi - lo
        self.intermediate_size = inter
        fmt = current_weight_format()
        self.int8_activations = fmt.int8_activations
        self.model_dtype = torch.get_default_dtype()
        self.w13, self.w13_scale = quantized_weight((local_experts, 2 * inter, hidden_size), fmt.kind)
        self.w2, self.w2_scale = quantized_weight((local_experts, hidden_size, inter), fmt.kind)
        # Tokens routed to each expert of the layer (all experts: the router runs on every rank), for the planner.
        self.register_buffer("tokens_per_expert", torch.zeros(num_experts, dtype=torch.int64), persistent=False)

    def checkpoint_views(self, name: str) -> dict[str, object]:
        views, inter, dtype = {}, self.intermediate_size, self.model_dtype
        first, stop = self.expert_range
        for e in range(self.tokens_per_expert.shape[0]):
            keys = [f"{name}.{e}.{proj}.weight" for proj in ("gate_proj", "up_proj", "down_proj")]
            if not first <= e < stop:
                views.update(dict.fromkeys(keys, OTHER_RANK))
                continue
            w13 = weight_rows(self.w13, self.w13_scale, e - first, dtype)
            views[keys[0]] = shard(w13[:inter], 0, *self.feature_range)
            views[keys[1]] = shard(w13[inter:], 0, *self.feature_range)
            views[keys[2]] = shard(weight_rows(self.w2, self.w2_scale, e - first, dtype), 1, *self.feature_range)
        return views

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        # A compiled step traces the platform's one-op path into its graph, but holds the expert loop as
        # one operator (its host-side counts cannot be traced); eagerly (and in training) it is plain code.
        looped = torch.compiler.is_compiling() and not current_platform().fuses_experts(x, self.w13, self.int8_activations)
        run = routed_experts if looped else run_experts
        return run(x, weights, ids, self.w13, self.w13_scale, self.w2, self.w2_scale,
                   self.tokens_per_expert, self.expert_range[0], self.int8_activations)


def run_experts(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, w13: torch.Tensor, w13_scale: Optional[torch.Tensor],
                w2: torch.Tensor, w2_scale: Optional[torch.Tensor], counts: torch.Tensor, first_expert: int,
                int8_activations: bool) -> torch.Tensor:
    """Sorts the (token, expert) pairs by expert and runs each busy expert this rank holds (w13 / w2
    hold experts first_expert.. of them) once on its tokens; adds the tokens routed to every expert
    to `counts`. Where the platform has one op for all experts (a few tokens on CPU), that runs
    instead. The loop over busy experts needs their token counts on the host, which a compiled graph
    cannot trace: it calls this as the operator `routed_experts`."""
    flat_ids = ids.flatten()
    platform = current_platform()
    if platform.fuses_experts(x, w13, int8_activations):
        counts.index_add_(0, flat_ids, torch.ones_like(flat_ids))  # bincount's shape depends on the ids: untraceable
        return platform.fused_experts(x, weights, ids, w13, w13_scale, w2, w2_scale, first_expert)
    routed = torch.bincount(flat_ids, minlength=counts.shape[0])
    counts += routed
    order = flat_ids.argsort(stable=True)
    token_of = order // ids.shape[1]
    out = torch.zeros_like(x)
    stop = first_expert + w13.shape[0]
    start = int(routed[:first_expert].sum()) if first_expert else 0
    for expert, count in enumerate(routed[first_expert:stop].tolist()):
        if count == 0:
            continue
        tokens = token_of[start : start + count]
        scale13, scale2 = (None, None) if w13_scale is None else (w13_scale[expert], w2_scale[expert])
        gate, up = matmul(x[tokens], w13[expert], scale13, None, int8_activations).chunk(2, dim=-1)
        y = matmul(F.silu(gate) * up, w2[expert], scale2, None, int8_activations)
        y = y * weights.flatten()[order[start : start + count], None]  # float32 weights: product in float32
        out.index_add_(0, tokens, y.to(out.dtype))
        start += count
    return out


routed_experts = torch.library.custom_op("xpuserve::routed_experts", run_experts, mutates_args=("counts",))


@routed_experts.register_fake
def _(x, weights, ids, w13, w13_scale, w2, w2_scale, counts, first_expert, int8_activations):
    return torch.empty_like(x)


class MoE(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate = Router(config)
        self.experts = Experts(config.n_routed_experts, config.hidden_size, config.moe_intermediate_size)
        self.shared_experts = (
            MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts, reduce=False)
            if config.n_shared_experts
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.gate(x)
        out = self.experts(x, weights, ids)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return all_reduce(out)  # combine: every rank's experts and its part of the shared experts
