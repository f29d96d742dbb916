"""beam_search(): candidate count, order and scores; parity with transformers' generate(num_beams=N)."""

from __future__ import annotations

import math

import pytest
import torch

from distill_core.teacher.beam import beam_search
from distill_core.teacher.sample import sample

PAD = 0


pytestmark = pytest.mark.usefixtures("one_thread")


def generate_beams(model, prompts, *, num_beams, max_new_tokens, length_penalty, eos_token_id):
    """generate()'s beams over one left-padded batch: per prompt [(completion ids up to EOS, score)]."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        out = model.generate(
            ids, attention_mask=mask, num_beams=num_beams, num_return_sequences=num_beams, do_sample=False,
            max_new_tokens=max_new_tokens, length_penalty=length_penalty, early_stopping=True,
            output_scores=True, return_dict_in_generate=True, pad_token_id=PAD, eos_token_id=eos_token_id,
        )
    found = []
    for i in range(len(prompts)):
        beams = []
        for row in range(i * num_beams, (i + 1) * num_beams):
            new = out.sequences[row, width:].tolist()
            if eos_token_id in new:
                new = new[: new.index(eos_token_id) + 1]
            beams.append((new, float(out.sequences_scores[row])))
        found.append(beams)
    return found


def midway_eos(model, prompts, length_penalty=1.0, num_beams=3, max_new_tokens=8):
    """An EOS that ends some of the final beams early, so the EOS path is exercised.

    Tried in turn: the tokens of the EOS-free beams, from their 2nd position on.
    """
    kw = dict(num_beams=num_beams, max_new_tokens=max_new_tokens, pad_token_id=PAD, batch_size=len(prompts))
    free = beam_search(model, prompts, eos_token_id=None, **kw)
    tried = []
    for eos in (t for candidates in free for c in candidates for t in c.completion_ids[1:]):
        if eos in tried:
            continue
        tried.append(eos)
        found = beam_search(model, prompts, eos_token_id=eos, length_penalty=length_penalty, **kw)
        if any(c.n_tokens < max_new_tokens for candidates in found for c in candidates):
            return eos
    raise AssertionError("no token of the EOS-free beams ends a beam early; change the prompts")


@pytest.mark.parametrize(
    "model_kind, length_penalty", [("gpt2", 1.0), ("gpt2", 0.5), ("gpt2", -1.0), ("llama", 1.0)]
)
def test_matches_generate_beams(model_kind, length_penalty, tiny_teacher, tiny_tokenizer, make_prompts, tiny_llama):
    model = tiny_teacher if model_kind == "gpt2" else tiny_llama
    prompts = make_prompts(5, seed=1)
    eos = midway_eos(model, prompts, length_penalty)
    kw = dict(num_beams=3, max_new_tokens=8, length_penalty=length_penalty, eos_token_id=eos)
    expected = generate_beams(model, prompts, **kw)
    # one batch padded like generate's, and length buckets (the static cache pads the last batch of 1)
    for batch_size, static_cache in [(5, False), (2, False), (2, True)]:
        found = beam_search(model, prompts, pad_token_id=PAD, batch_size=batch_size, static_cache=static_cache, **kw)
        assert len(found) == len(prompts)
        for candidates, beams in zip(found, expected):
            assert [c.completion_ids for c in candidates] == [ids for ids, _ in beams]
            torch.testing.assert_close([c.score for c in candidates], [s for _, s in beams], atol=1e-5, rtol=1e-6)  # float32 sums in another order: length_penalty -1 scales them by the length


@pytest.mark.parametrize("model_kind", ["gpt2", "llama"])
def test_compiled_beam_step_is_one_graph_and_finds_the_same_candidates(model_kind, tiny_teacher, make_prompts, tiny_llama):
    from torch._dynamo.utils import counters

    model = tiny_teacher if model_kind == "gpt2" else tiny_llama
    prompts = make_prompts(5, seed=1)
    kw = dict(num_beams=3, max_new_tokens=8, eos_token_id=midway_eos(model, prompts), pad_token_id=PAD, batch_size=2)
    eager = beam_search(model, prompts, **kw)
    torch._dynamo.reset()
    counters.clear()
    compiled = beam_search(model, prompts, static_cache=True, compile=True, **kw)
    for a, b in zip(compiled, eager):
        assert [c.completion_ids for c in a] == [c.completion_ids for c in b]
        torch.testing.assert_close([c.score for c in a], [c.score for c in b], atol=1e-4, rtol=0)
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]


def test_candidates_are_sorted_and_scored(tiny_teacher, tiny_tokenizer, make_prompts):
    prompts = make_prompts(4, seed=2)
    eos = midway_eos(tiny_teacher, prompts, 0.5, num_beams=4, max_new_tokens=7)
    found = beam_search(
        tiny_teacher, prompts, num_beams=4, max_new_tokens=7, length_penalty=0.5, eos_token_id=eos,
        pad_token_id=PAD, batch_size=3,
    )
    assert len(found) == len(prompts)
    for prompt, candidates in zip(prompts, found):
        assert [c.rank for c in candidates] == [0, 1, 2, 3]
        assert len({tuple(c.completion_ids) for c in candidates}) == 4
        scores = [c.score for c in candidates]
        assert scores == sorted(scores, reverse=True)
        for c in candidates:
            assert c.n_tokens == len(c.completion_ids)
            assert math.isclose(c.score, c.sum_logprob / c.n_tokens**0.5, rel_tol=1e-6)
            # finished: by EOS (only at the end) or by length
            assert eos not in c.completion_ids[:-1]
            assert c.completion_ids[-1] == eos or c.n_tokens == 7
            # sum_logprob is the teacher's own log-probability of the completion
            ids = torch.tensor([prompt + c.completion_ids])
            with torch.inference_mode():
                logits = tiny_teacher(ids).logits[0, len(prompt) - 1 : -1]
            expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(c.completion_ids)[:, None]).sum()
            assert math.isclose(c.sum_logprob, float(expected), abs_tol=1e-4)


def test_one_beam_is_greedy(tiny_teacher, tiny_tokenizer, make_prompts):
    prompts = make_prompts(4, seed=3)
    eos = midway_eos(tiny_teacher, prompts, num_beams=1, max_new_tokens=6)
    greedy = sample(
        tiny_teacher, prompts, num_samples=1, max_new_tokens=6, top_k=1, eos_token_id=eos, pad_token_id=PAD,
        seed=0, batch_size=4,
    )
    found = beam_search(
        tiny_teacher, prompts, num_beams=1, max_new_tokens=6, eos_token_id=eos, pad_token_id=PAD, batch_size=4
    )
    for g, candidates in zip(greedy, found):
        assert len(candidates) == 1
        assert candidates[0].completion_ids == g.completion_ids
        assert math.isclose(candidates[0].sum_logprob, sum(g.token_logprobs), abs_tol=1e-4)


def test_without_eos_every_candidate_runs_to_the_limit(tiny_teacher, tiny_tokenizer, make_prompts):
    prompts = make_prompts(3, seed=4)
    found = beam_search(
        tiny_teacher, prompts, num_beams=2, max_new_tokens=5, eos_token_id=None, pad_token_id=PAD, batch_size=2
    )
    assert all(c.n_tokens == 5 for candidates in found for c in candidates)
    assert beam_search(tiny_teacher, [], num_beams=2, max_new_tokens=5, eos_token_id=None, pad_token_id=PAD, batch_size=2) == []


def test_refuses_bad_input(tiny_teacher):
    kw = dict(num_beams=2, max_new_tokens=4, eos_token_id=None, pad_token_id=PAD, batch_size=2)
    with pytest.raises(ValueError, match="static_cache"):
        beam_search(tiny_teacher, [[1, 2]], compile=True, **kw)
    with pytest.raises(ValueError, match="sync_every"):
        beam_search(tiny_teacher, [[1, 2]], sync_every=0, **kw)
    with pytest.raises(ValueError, match="empty"):
        beam_search(tiny_teacher, [[1, 2], []], **kw)
    assert beam_search(tiny_teacher, [], **kw) == []
