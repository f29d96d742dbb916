"""What the slicer knows of an architecture: its geometry and where its prunable tensors sit.

Two families: GPT-2 (``Conv1D`` weights stored ``[in, out]``, fused ``c_attn``, learned positions,
LayerNorm with bias) and Llama-style models (Llama, Mistral, Qwen2, Qwen3, SmolLM2: ``q/k/v/o``
and ``gate/up/down`` ``nn.Linear`` weights stored ``[out, in]``, RMSNorm, grouped-query attention).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from distill_core.errors import TeacherError

LLAMA_TYPES = ("llama", "mistral", "qwen2", "qwen3")
Family = Literal["gpt2", "llama"]


@dataclass(frozen=True)
class Geometry:
    """Sizes of one model (or of a student shape): layers, hidden width, MLP width, heads, KV groups."""

    family: Family
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def group_size(self) -> int:
        """Query heads per KV group (1 without grouped-query attention)."""
        return self.num_heads // self.num_kv_heads


def family_of(config) -> Family:
    """The slicer family of a transformers config, or a TeacherError naming what it knows."""
    model_type = getattr(config, "model_type", None)
    if model_type == "gpt2":
        return "gpt2"
    if model_type in LLAMA_TYPES:
        return "llama"
    raise TeacherError(
        f"student.init 'pruned' cannot slice a {model_type!r} teacher: it knows GPT-2 and the Llama family "
        f"({', '.join(LLAMA_TYPES)}). Use student.init 'teacher_layers' (any decoder) for this teacher."
    )


def geometry(config) -> Geometry:
    """The geometry of a transformers config of a known family."""
    family = family_of(config)
    if family == "gpt2":
        d, h = config.n_embd, config.n_head
        return Geometry(family, config.n_layer, d, config.n_inner or 4 * d, h, h, d // h)
    if getattr(config, "mlp_layer_types", None) or getattr(config, "num_experts", None):
        raise TeacherError(f"{config.model_type} teacher has mixture-of-experts layers, which the pruning slicer does not "
                           "handle: use student.init 'teacher_layers'.")
    h = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or h
    hd = getattr(config, "head_dim", None) or config.hidden_size // h
    return Geometry(family, config.num_hidden_layers, config.hidden_size, config.intermediate_size, h, kv, hd)


def blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a model of a known family."""
    return model.transformer.h if family_of(model.config) == "gpt2" else model.model.layers


def mlp_down(block: nn.Module) -> nn.Module:
    """The MLP's output projection, whose input is one activation per neuron ``[B, T, I]``."""
    return block.mlp.c_proj if hasattr(block.mlp, "c_proj") else block.mlp.down_proj


def attn_out(block: nn.Module) -> nn.Module:
    """The attention's output projection, whose input is the heads' outputs side by side ``[B, T, H·hd]``."""
    return block.attn.c_proj if hasattr(block, "attn") else block.self_attn.o_proj


def norms(model: nn.Module) -> list[nn.Module]:
    """Every norm whose output lives in the hidden (residual) space: two per block and the final one."""
    if family_of(model.config) == "gpt2":
        return [n for b in model.transformer.h for n in (b.ln_1, b.ln_2)] + [model.transformer.ln_f]
    return [n for b in model.model.layers for n in (b.input_layernorm, b.post_attention_layernorm)] + [model.model.norm]
