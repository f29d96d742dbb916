"""The calibration pass: identity layers have no influence, dead neurons and groups score zero."""

from __future__ import annotations

import copy

import pytest
import torch

from distill_core.pruning.arch import attn_out, blocks, geometry, mlp_down
from distill_core.pruning.importance import calibrate
from distill_core.pruning.slicing import choose_layers


def _silence(block, family):
    """Zero the block's two output projections: the block then passes its input through unchanged."""
    with torch.no_grad():
        for proj in (attn_out(block), mlp_down(block)):
            proj.weight.zero_()
            if getattr(proj, "bias", None) is not None:
                proj.bias.zero_()


def test_identity_layers_have_zero_influence_and_rank_last(model, ids):
    m = copy.deepcopy(model)
    for i in (1, 2):
        _silence(blocks(m)[i], geometry(m.config).family)
    imp = calibrate(m, ids)
    assert imp.block_influence.shape == (4,)
    torch.testing.assert_close(imp.block_influence[[1, 2]], torch.zeros(2, dtype=torch.float64), atol=1e-6, rtol=0)
    assert (imp.block_influence[[0, 3]] > 1e-3).all()
    assert choose_layers(imp.block_influence, 2) == (0, 3)


def test_dead_neurons_and_groups_score_zero_and_shapes_follow_the_model(llama, ids):
    m = copy.deepcopy(llama)
    geo = geometry(m.config)
    with torch.no_grad():
        blocks(m)[0].mlp.up_proj.weight[[3, 7]] = 0.0  # SiLU(gate)·0: those neurons' activations are 0
        blocks(m)[1].self_attn.v_proj.weight[geo.head_dim : 2 * geo.head_dim] = 0.0  # KV group 1 outputs 0
    imp = calibrate(m, ids, batch_size=2)
    assert imp.neurons.shape == (4, geo.intermediate_size) and imp.groups.shape == (4, 3) and imp.channels.shape == (48,)
    assert imp.neurons[0, [3, 7]].abs().max() == 0 and (imp.neurons[0].count_nonzero() == geo.intermediate_size - 2)
    assert imp.groups[1, 1] == 0 and (imp.groups[1, [0, 2]] > 0).all()
    assert imp.tokens == ids.numel()


def test_batching_does_not_change_the_scores(llama, ids):
    a, b = calibrate(llama, ids, batch_size=1), calibrate(llama, ids, batch_size=3)
    for x, y in ((a.block_influence, b.block_influence), (a.neurons, b.neurons), (a.groups, b.groups), (a.channels, b.channels)):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-9)


def test_calibration_needs_a_batch_of_sequences(llama):
    with pytest.raises(ValueError, match=r"\[N, T\]"):
        calibrate(llama, torch.zeros(5, dtype=torch.int64))
