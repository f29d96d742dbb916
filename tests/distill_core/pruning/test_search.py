"""The shape search: candidates respect the budget, and the search is deterministic from its seed."""

from __future__ import annotations

import torch

from distill_core.pruning.importance import calibrate
from distill_core.pruning.search import Candidate, candidates, count_params, search, shape_params, spread, width_step
from distill_core.student import count_parameters


def test_count_params_matches_a_built_model(llama):
    assert count_params(llama.config) == count_parameters(llama)


def test_candidates_lie_within_the_budget_and_their_counts_are_exact(llama):
    target = shape_params(llama.config, 3, 24, 3, 48)  # 34,512 of the teacher's 54,192
    found = candidates(llama.config, target, 3, 48, tolerance=0.05)
    assert [(c.layers, c.intermediate_size) for c in found] == [(3, 24), (4, 8)]
    assert all(abs(c.params - target) <= 0.05 * target for c in found)
    assert [c.layers for c in found] == sorted({c.layers for c in found})  # one width per depth
    for c in found:
        assert c.intermediate_size % width_step(40) == 0 and width_step(40) == 8 and width_step(1536) == 32
        assert shape_params(llama.config, c.layers, c.intermediate_size, 3, 48) == c.params


def test_spread_takes_evenly_spaced_depths():
    found = [Candidate(n, 32, 100) for n in range(1, 11)]
    assert [c.layers for c in spread(found, 4)] == [1, 4, 7, 10]
    assert [c.layers for c in spread(found, 1)] == [6]
    assert spread(found[:2], 4) == found[:2]


def test_search_is_deterministic_and_keeps_the_best_held_out_loss(llama):
    g = torch.Generator().manual_seed(3)
    heal, held = torch.randint(0, 64, (4, 12), generator=g), torch.randint(0, 64, (2, 12), generator=g)
    imp = calibrate(llama, heal)
    found = [Candidate(2, 16, 0), Candidate(3, 16, 0)]
    run = lambda: search(llama, imp, found, 3, 48, heal, held, steps=2, lr=1e-3, batch_size=2, seed=0)  # noqa: E731
    (shape_a, rec_a), (shape_b, rec_b) = run(), run()
    assert rec_a == rec_b and shape_a == shape_b
    best = min(rec_a, key=lambda r: r["held_out_loss"])
    assert len(shape_a.layers) == best["layers"] and shape_a.intermediate_size == 16
    assert shape_a.layers[0] == 0 and shape_a.layers[-1] == 3
