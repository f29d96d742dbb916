"""A plan of what a pruned student keeps, and the student cut from the teacher by it.

The student is a model of the teacher's class with a smaller config, so ``from_pretrained`` loads
it; each of its tensors is the teacher's tensor indexed along the pruned dimensions (kept layers,
then per layer the kept MLP neurons and KV groups with their query heads, and everywhere the kept
hidden channels). Keeping everything reproduces the teacher exactly; dropping neurons or groups
equals zeroing their columns of the output projection.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from distill_core.errors import TeacherError
from distill_core.pruning.arch import Geometry, blocks, geometry
from distill_core.pruning.importance import Importance


@dataclass(frozen=True)
class Shape:
    """A student shape in teacher terms: the teacher layers kept (in order) and the widths kept."""

    layers: tuple[int, ...]
    intermediate_size: int
    num_kv_heads: int
    hidden_size: int


@dataclass(frozen=True)
class PrunePlan:
    """Teacher indices a student keeps: ``neurons[j]`` and ``groups[j]`` belong to student layer ``j``
    (teacher layer ``layers[j]``); ``channels`` are hidden channels, the same in every layer. All sorted."""

    layers: tuple[int, ...]
    neurons: tuple[tuple[int, ...], ...]
    groups: tuple[tuple[int, ...], ...]
    channels: tuple[int, ...]

    def to_dict(self) -> dict:
        return {"layers": list(self.layers), "neurons": [list(n) for n in self.neurons],
                "groups": [list(g) for g in self.groups], "channels": list(self.channels)}

    @classmethod
    def from_dict(cls, d: dict) -> "PrunePlan":
        return cls(tuple(d["layers"]), tuple(map(tuple, d["neurons"])), tuple(map(tuple, d["groups"])), tuple(d["channels"]))

    def shape(self) -> Shape:
        return Shape(self.layers, len(self.neurons[0]), len(self.groups[0]), len(self.channels))


def choose_layers(influence: torch.Tensor, count: int) -> tuple[int, ...]:
    """The ``count`` layers of highest block influence ``[L]``, first and last always among them, in order."""
    n = len(influence)
    if not 1 <= count <= n:
        raise ValueError(f"cannot keep {count} of {n} layers")
    if count == 1:
        return (n - 1,)
    ends = {0, n - 1}
    inner = sorted((i for i in range(n) if i not in ends), key=lambda i: (-float(influence[i]), i))
    return tuple(sorted(ends | set(inner[: count - len(ends)])))


def plan_for(importance: Importance, shape: Shape) -> PrunePlan:
    """Keep, per kept layer, its most important MLP neurons and KV groups, and the most important channels."""

    def top(scores: torch.Tensor, k: int) -> tuple[int, ...]:
        return tuple(sorted(int(i) for i in torch.topk(scores, k, sorted=False).indices))

    return PrunePlan(
        tuple(shape.layers),
        tuple(top(importance.neurons[i], shape.intermediate_size) for i in shape.layers),
        tuple(top(importance.groups[i], shape.num_kv_heads) for i in shape.layers),
        top(importance.channels, shape.hidden_size),
    )


def full_plan(geo: Geometry) -> PrunePlan:
    """The plan that keeps everything (the teacher itself)."""
    return PrunePlan(tuple(range(geo.num_layers)), (tuple(range(geo.intermediate_size)),) * geo.num_layers,
                     (tuple(range(geo.num_kv_heads)),) * geo.num_layers, tuple(range(geo.hidden_size)))


def student_config(teacher_config, shape: Shape):
    """The teacher's config with the student's depth and widths (per-layer lists subset to ``shape.layers``)."""
    from distill_core.student import config_with_layers

    geo = geometry(teacher_config)
    config = config_with_layers(teacher_config, list(shape.layers), geo.num_layers)
    if geo.family == "gpt2":
        config.n_inner = shape.intermediate_size
    else:
        config.intermediate_size = shape.intermediate_size
        config.num_key_value_heads = shape.num_kv_heads
        config.num_attention_heads = shape.num_kv_heads * geo.group_size
        config.hidden_size = shape.hidden_size
        config.head_dim = geo.head_dim  # explicit: no longer hidden_size / heads once either is pruned
    return config


def prune(teacher: nn.Module, plan: PrunePlan) -> nn.Module:
    """A model of the teacher's class keeping what ``plan`` names, its tensors sliced from the teacher's (on CPU)."""
    geo = geometry(teacher.config)
    config = student_config(teacher.config, plan.shape())
    student = type(teacher)(config).to(teacher.dtype)
    student.generation_config = copy.deepcopy(teacher.generation_config)
    prefix = "transformer.h." if geo.family == "gpt2" else "model.layers."
    channels = torch.tensor(plan.channels)
    t_state = teacher.state_dict()
    with torch.no_grad():
        for key, target in student.state_dict().items():
            if key.startswith(prefix):
                j, rest = key[len(prefix):].split(".", 1)
                j = int(j)
                t_key = f"{prefix}{plan.layers[j]}.{rest}"
                index = _layer_index(geo, rest, channels, plan.neurons[j], plan.groups[j])
            else:
                t_key, index = key, _outer_index(geo, key, channels)
            sliced = t_state[t_key]
            for dim, idx in index.items():
                sliced = sliced.index_select(dim, idx)
            if sliced.shape != target.shape:
                raise AssertionError(f"{key} {tuple(target.shape)} <- {t_key} sliced to {tuple(sliced.shape)}")
            target.copy_(sliced)
    if len(blocks(student)) != len(plan.layers):
        raise AssertionError((len(blocks(student)), plan.layers))
    return student


# -- which dimension of which tensor is pruned by what ---------------------------------------------
def _rows(units: tuple[int, ...], width: int) -> torch.Tensor:
    """Row indices of the kept ``units`` when each unit spans ``width`` consecutive rows."""
    return (torch.tensor(units)[:, None] * width + torch.arange(width)).flatten()


def _layer_index(geo: Geometry, rest: str, c: torch.Tensor, neurons, groups) -> dict[int, torch.Tensor]:
    n = torch.tensor(neurons)
    if geo.family == "gpt2":  # Conv1D weights are [in, out]; heads and hidden width are never pruned (checked before)
        table = {
            "ln_1.weight": {0: c}, "ln_1.bias": {0: c}, "ln_2.weight": {0: c}, "ln_2.bias": {0: c},
            "attn.c_attn.weight": {0: c}, "attn.c_attn.bias": {},
            "attn.c_proj.weight": {1: c}, "attn.c_proj.bias": {0: c},
            "mlp.c_fc.weight": {0: c, 1: n}, "mlp.c_fc.bias": {0: n},
            "mlp.c_proj.weight": {0: n, 1: c}, "mlp.c_proj.bias": {0: c},
        }
    else:  # nn.Linear weights are [out, in]
        q = _rows(tuple(h for g in groups for h in range(g * geo.group_size, (g + 1) * geo.group_size)), geo.head_dim)
        kv = _rows(tuple(groups), geo.head_dim)
        table = {
            "input_layernorm.weight": {0: c}, "post_attention_layernorm.weight": {0: c},
            "self_attn.q_proj.weight": {0: q, 1: c}, "self_attn.q_proj.bias": {0: q},
            "self_attn.k_proj.weight": {0: kv, 1: c}, "self_attn.k_proj.bias": {0: kv},
            "self_attn.v_proj.weight": {0: kv, 1: c}, "self_attn.v_proj.bias": {0: kv},
            "self_attn.o_proj.weight": {0: c, 1: q}, "self_attn.o_proj.bias": {0: c},
            "self_attn.q_norm.weight": {}, "self_attn.k_norm.weight": {},
            "mlp.gate_proj.weight": {0: n, 1: c}, "mlp.gate_proj.bias": {0: n},
            "mlp.up_proj.weight": {0: n, 1: c}, "mlp.up_proj.bias": {0: n},
            "mlp.down_proj.weight": {0: c, 1: n}, "mlp.down_proj.bias": {0: c},
        }
    if rest not in table:
        raise TeacherError(f"the pruning slicer does not know the block tensor {rest!r} of this {geo.family}-family "
                           "teacher: use student.init 'teacher_layers'.")
    return table[rest]


def _outer_index(geo: Geometry, key: str, c: torch.Tensor) -> dict[int, torch.Tensor]:
    table = {
        "transformer.wte.weight": {1: c}, "transformer.wpe.weight": {1: c},
        "transformer.ln_f.weight": {0: c}, "transformer.ln_f.bias": {0: c},
        "model.embed_tokens.weight": {1: c}, "model.norm.weight": {0: c},
        "lm_head.weight": {1: c}, "lm_head.bias": {},
    }
    if key not in table:
        raise TeacherError(f"the pruning slicer does not know the tensor {key!r} of this {geo.family}-family teacher: "
                           "use student.init 'teacher_layers'.")
    return table[key]
