"""The slicer against the teacher itself: keeping all is exact, dropping a unit equals zeroing it."""

from __future__ import annotations

import copy

import pytest
import torch

from distill_core.pruning.arch import attn_out, blocks, geometry, mlp_down
from distill_core.pruning.importance import calibrate
from distill_core.pruning.slicing import PrunePlan, Shape, choose_layers, full_plan, plan_for, prune


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_keeping_everything_gives_the_teachers_logits_exactly(model, ids):
    student = prune(model, full_plan(geometry(model.config)))
    assert torch.equal(_logits(student, ids), _logits(model, ids))


def test_removing_mlp_neurons_equals_zeroing_their_output_columns(model, ids):
    geo = geometry(model.config)
    dropped = {0: [1, 5, 7], 1: [2, 9, 11], 2: [0, 3, 4], 3: [4, 6, 30]}  # the same count in every layer
    keep = tuple(tuple(i for i in range(geo.intermediate_size) if i not in dropped[j]) for j in range(4))
    plan = PrunePlan(tuple(range(4)), keep, full_plan(geo).groups, full_plan(geo).channels)
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        for j, block in enumerate(blocks(zeroed)):
            w = mlp_down(block).weight  # GPT-2 Conv1D [I, D]; Llama Linear [D, I]
            if geo.family == "gpt2":
                w[dropped[j]] = 0.0
            else:
                w[:, dropped[j]] = 0.0
    student = prune(model, plan)
    assert geometry(student.config).intermediate_size == geo.intermediate_size - 3
    torch.testing.assert_close(_logits(student, ids), _logits(zeroed, ids), rtol=1e-5, atol=1e-5)


def test_removing_kv_groups_equals_zeroing_their_query_heads_output(llama, ids):
    geo = geometry(llama.config)  # 6 heads in 3 KV groups of 2
    groups = ((0, 2), (1, 2), (0, 1), (0, 2))
    plan = PrunePlan(tuple(range(4)), full_plan(geo).neurons, groups, full_plan(geo).channels)
    zeroed = copy.deepcopy(llama)
    with torch.no_grad():
        for j, block in enumerate(blocks(zeroed)):
            for g in set(range(3)) - set(groups[j]):
                for h in (2 * g, 2 * g + 1):
                    attn_out(block).weight[:, h * geo.head_dim : (h + 1) * geo.head_dim] = 0.0
    student = prune(llama, plan)
    assert (student.config.num_attention_heads, student.config.num_key_value_heads, student.config.head_dim) == (4, 2, 8)
    torch.testing.assert_close(_logits(student, ids), _logits(zeroed, ids), rtol=1e-5, atol=1e-5)


def test_removing_layers_equals_the_teacher_without_those_blocks(model, ids):
    geo = geometry(model.config)
    plan = PrunePlan((0, 3), full_plan(geo).neurons[:2], full_plan(geo).groups[:2], full_plan(geo).channels)
    skipped = copy.deepcopy(model)
    for i in (1, 2):  # an identity block: the residual stream passes through unchanged
        blocks(skipped)[i].forward = lambda hidden_states, *a, **k: hidden_states
    torch.testing.assert_close(_logits(prune(model, plan), ids), _logits(skipped, ids), rtol=1e-5, atol=1e-5)


def test_hidden_channels_shrink_every_hidden_tensor_and_the_student_reloads_and_generates(llama, ids, tmp_path):
    from transformers import AutoModelForCausalLM

    imp = calibrate(llama, ids)
    plan = plan_for(imp, Shape((0, 2, 3), 24, 2, 40))
    student = prune(llama, plan)
    assert student.config.hidden_size == 40 and student.model.embed_tokens.weight.shape == (64, 40)
    assert student.lm_head.weight.data_ptr() == student.model.embed_tokens.weight.data_ptr()  # still tied
    torch.testing.assert_close(student.model.embed_tokens.weight, llama.model.embed_tokens.weight[:, list(plan.channels)])
    student.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(_logits(again, ids), _logits(student, ids))
    out = again.generate(ids[:1, :4], max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 9)


def test_choose_layers_keeps_the_ends_and_the_most_influential():
    influence = torch.tensor([0.9, 0.1, 0.5, 0.05, 0.3, 0.8])
    assert choose_layers(influence, 4) == (0, 2, 4, 5)
    assert choose_layers(influence, 2) == (0, 5)
    assert choose_layers(influence, 6) == tuple(range(6))
    with pytest.raises(ValueError):
        choose_layers(influence, 7)


def test_plan_round_trips_through_json(llama, ids):
    import json

    plan = plan_for(calibrate(llama, ids), Shape((0, 3), 16, 1, 32))
    assert PrunePlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    assert plan.shape() == Shape((0, 3), 16, 1, 32)
