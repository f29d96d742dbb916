"""One calibration pass of the teacher scoring what a pruned student keeps.

- depth: block influence of layer i = 1 − mean cosine similarity of its input and output hidden
  states over the calibration tokens (ShortGPT, arXiv 2403.03853): a layer that barely turns the
  residual stream matters little;
- MLP neurons: sqrt of the sum over sequences of the sequence-mean squared activation at the MLP's
  output projection input (Minitron, arXiv 2407.14679);
- KV groups: the same norm of the attention heads' outputs (input of the output projection), summed
  over the query heads that share a KV group, so whole groups go with their query heads;
- hidden channels: the same norm of every hidden-space norm layer's output, summed over the norms.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from distill_core.pruning.arch import attn_out, blocks, geometry, mlp_down, norms


@dataclass(frozen=True)
class Importance:
    """Scores from :func:`calibrate`; higher means more important.

    block_influence ``[L]``, neurons ``[L, I]``, groups ``[L, KV]``, channels ``[D]``, all float64 on CPU.
    """

    block_influence: torch.Tensor
    neurons: torch.Tensor
    groups: torch.Tensor
    channels: torch.Tensor
    tokens: int

    def summary(self) -> dict:
        """JSON-ready lineage: the per-layer influence in full, the other scores' per-layer means."""
        return {
            "calibration_tokens": self.tokens,
            "block_influence": [round(float(v), 6) for v in self.block_influence],
            "mlp_importance_mean": [round(float(v), 6) for v in self.neurons.mean(1)],
            "kv_group_importance": [[round(float(v), 6) for v in row] for row in self.groups],
        }


@torch.no_grad()
def calibrate(model: nn.Module, input_ids: torch.Tensor, batch_size: int = 8) -> Importance:
    """Score ``model``'s layers, MLP neurons, KV groups and hidden channels on ``input_ids`` ``[N, T]``
    (int64 token ids of unpadded, packed sequences), ``batch_size`` sequences per forward."""
    if input_ids.ndim != 2 or input_ids.shape[0] < 1:
        raise ValueError(f"calibration input_ids must be [N, T] with N >= 1, got {tuple(input_ids.shape)}")
    geo = geometry(model.config)
    layers = blocks(model)
    device = next(model.parameters()).device
    L = len(layers)
    cos_sum = torch.zeros(L, dtype=torch.float64)
    neurons = torch.zeros(L, geo.intermediate_size, dtype=torch.float64)
    heads = torch.zeros(L, geo.num_heads, dtype=torch.float64)
    channels = torch.zeros(geo.hidden_size, dtype=torch.float64)

    def seq_mean_sq(x: torch.Tensor) -> torch.Tensor:  # [B, T, C] -> [C]: sum over sequences of the mean over T
        return x.detach().double().pow(2).mean(1).sum(0).cpu()

    def on_block(i):
        def hook(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, tuple) else output
            cos_sum[i] += F.cosine_similarity(x.double(), y.double(), dim=-1).sum().cpu()
        return hook

    def on_down(i):
        def hook(module, args):
            neurons[i] += seq_mean_sq(args[0])
        return hook

    def on_attn(i):
        def hook(module, args):
            x = args[0]
            heads[i] += x.detach().double().unflatten(-1, (geo.num_heads, -1)).pow(2).sum(-1).mean(1).sum(0).cpu()
        return hook

    def on_norm(module, args, output):
        channels.add_(seq_mean_sq(output))

    handles = []
    for i, block in enumerate(layers):
        handles.append(block.register_forward_hook(on_block(i), with_kwargs=True))
        handles.append(mlp_down(block).register_forward_pre_hook(on_down(i)))
        handles.append(attn_out(block).register_forward_pre_hook(on_attn(i)))
    handles += [n.register_forward_hook(on_norm) for n in norms(model)]
    was_training = model.training
    model.eval()
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            model(input_ids=input_ids[start : start + batch_size].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    tokens = input_ids.numel()
    groups = heads.view(L, geo.num_kv_heads, geo.group_size).sum(-1)
    return Importance(1.0 - cos_sum / tokens, neurons.sqrt(), groups.sqrt(), channels.sqrt(), tokens)
