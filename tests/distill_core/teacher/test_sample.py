"""sample(): greedy parity with generate, seeding, EOS, teacher logprobs and soft top-k against a forward pass."""

from __future__ import annotations


import pytest
import torch

from distill_core.losses.divergence import topk_targets_from_logits
from distill_core.teacher.sample import sample

PAD = 0


pytestmark = pytest.mark.usefixtures("one_thread")


def generate_greedy(model, prompts, max_new_tokens):
    """transformers' own greedy decoding over one left-padded batch (no EOS), as lists of new ids."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        out = model.generate(
            ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens, pad_token_id=PAD, eos_token_id=None,
        )
    return out[:, width:].tolist()


def completions(results):
    return [r.completion_ids for r in results]


def run(model, prompts, **kw):
    args = dict(num_samples=2, max_new_tokens=10, eos_token_id=None, pad_token_id=PAD, seed=0, batch_size=3)
    return sample(model, prompts, **(args | kw))


@pytest.mark.parametrize("model_kind", ["gpt2", "llama"])
def test_greedy_matches_generate_for_every_batch_size(model_kind, tiny_teacher, tiny_tokenizer, make_prompts, tiny_llama):
    model = tiny_teacher if model_kind == "gpt2" else tiny_llama
    prompts = make_prompts(7)
    expected = generate_greedy(model, prompts, max_new_tokens=10)
    for batch_size in (1, 3, 7):
        results = run(model, prompts, top_k=1, batch_size=batch_size)
        assert [(r.prompt_index, r.sample_idx) for r in results] == [(i, s) for i in range(7) for s in range(2)]
        assert completions(results) == [e for e in expected for _ in range(2)]
        assert all(r.finish_reason == "length" for r in results)
    # temperature 0 is greedy too, and draws nothing from the generator
    assert completions(run(model, prompts, temperature=0.0, seed=5)) == [e for e in expected for _ in range(2)]


def test_same_seed_same_samples_different_seed_differs(tiny_teacher, tiny_tokenizer, make_prompts):
    prompts = make_prompts(5)
    first = run(tiny_teacher, prompts, num_samples=3, seed=1)
    again = run(tiny_teacher, prompts, num_samples=3, seed=1)
    other = run(tiny_teacher, prompts, num_samples=3, seed=2)
    assert completions(first) == completions(again)
    assert [r.token_logprobs for r in first] == [r.token_logprobs for r in again]
    assert completions(first) != completions(other)
    # the samples of one prompt are independent draws, not copies
    assert len({tuple(r.completion_ids) for r in first if r.prompt_index == 0}) > 1


@pytest.mark.parametrize("knobs", [dict(top_k=1), dict(temperature=0.8, top_k=8, top_p=0.9)])
def test_eos_finishes_a_row_and_only_truncates_it(knobs, tiny_teacher, tiny_tokenizer, make_prompts):
    """With an EOS, every row is the EOS-free row cut after its first EOS (finished rows dropped or not)."""
    prompts = make_prompts(6)
    free = run(tiny_teacher, prompts, max_new_tokens=12, **knobs)
    # An EOS the teacher emits mid-row: the third token of the first row.
    eos = free[0].completion_ids[2]

    def cut(ids):
        return ids[: ids.index(eos) + 1] if eos in ids else ids

    for sync_every in (1, 5):  # every step (drops finished rows early) and rarely
        stopped = run(tiny_teacher, prompts, max_new_tokens=12, eos_token_id=eos, sync_every=sync_every, **knobs)
        assert completions(stopped) == [cut(r.completion_ids) for r in free]
        for r in stopped:
            assert r.finish_reason == ("eos" if r.completion_ids[-1] == eos else "length")
            assert len(r.token_logprobs) == len(r.completion_ids)
        assert stopped[0].finish_reason == "eos" and len(stopped[0].completion_ids) <= 3


@pytest.mark.parametrize("model_kind", ["gpt2", "llama"])
def test_static_cache_matches_dynamic(model_kind, tiny_teacher, tiny_tokenizer, make_prompts, tiny_llama):
    model = tiny_teacher if model_kind == "gpt2" else tiny_llama
    prompts = make_prompts(5)  # batches of 2, 2, 1: the last is padded
    eos = run(model, prompts, batch_size=2, top_k=20)[0].completion_ids[3]
    dynamic = run(model, prompts, batch_size=2, top_k=20, eos_token_id=eos, sync_every=2)
    static = run(model, prompts, batch_size=2, top_k=20, eos_token_id=eos, sync_every=2, static_cache=True)
    assert any(r.finish_reason == "eos" for r in dynamic)
    assert completions(static) == completions(dynamic)
    assert [r.finish_reason for r in static] == [r.finish_reason for r in dynamic]
    for a, b in zip(static, dynamic):
        torch.testing.assert_close(a.token_logprobs, b.token_logprobs, atol=1e-5, rtol=0)
    # a batch of one-token prompts: the prefill is a single query, and the static cache's unwritten
    # slots must stay masked
    one_token = [[p[0]] for p in prompts]
    assert completions(run(model, one_token, top_k=1, static_cache=True)) == completions(run(model, one_token, top_k=1))



@pytest.mark.parametrize("model_kind", ["gpt2", "llama"])
def test_compiled_decode_step_is_one_graph_and_matches_eager(model_kind, tiny_teacher, make_prompts, tiny_llama):
    """CUDA graphs replay one captured graph: the compiled step must not break or recompile per step or batch."""
    from torch._dynamo.utils import counters

    model = tiny_teacher if model_kind == "gpt2" else tiny_llama
    prompts = make_prompts(5)  # batches of 2, 2, 1: the last is padded to the same shape
    eager = run(model, prompts, batch_size=2, top_k=20, static_cache=True)
    torch._dynamo.reset()
    counters.clear()
    compiled = run(model, prompts, batch_size=2, top_k=20, static_cache=True, compile=True)
    assert completions(compiled) == completions(eager)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a.token_logprobs, b.token_logprobs, atol=1e-4, rtol=0)
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]


def test_threads_sharing_a_model_take_turns_with_its_static_cache(tiny_teacher, make_prompts):
    """Shard tasks on a thread pool share one teacher, and the static path keeps one cache per model."""
    from concurrent.futures import ThreadPoolExecutor

    def job(seed: int) -> list[list[int]]:
        prompts = [(p * 5)[:5] for p in make_prompts(6, seed=seed)]  # one cache shape for every job: all share one cache
        return completions(run(tiny_teacher, prompts, static_cache=True, max_new_tokens=48, seed=seed))

    alone = [job(seed) for seed in range(4)]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(job, range(4)))
    assert together == alone


def test_a_failed_static_cache_allocation_releases_the_models_lock(tiny_llama, make_prompts, monkeypatch):
    """Out of memory while allocating the static cache must not leave the model locked for later calls."""
    import transformers

    from distill_core.teacher.decode import StaticPlan

    prompts = make_prompts(3, seed=1)
    expected = completions(run(tiny_llama, prompts, static_cache=True))

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("no room for the static cache")

    with monkeypatch.context() as m:
        m.setattr(transformers, "StaticCache", out_of_memory)
        with pytest.raises(torch.OutOfMemoryError):
            run(tiny_llama, prompts, static_cache=True, batch_size=2)  # a new shape: a new cache
    lock = StaticPlan._per_model[tiny_llama]["lock"]
    assert lock.acquire(timeout=1)
    lock.release()
    assert "shape" not in StaticPlan._per_model[tiny_llama]  # the failed shape was not recorded
    assert completions(run(tiny_llama, prompts, static_cache=True)) == expected  # the next call works

def teacher_logprobs(model, prompt, completion, temperature=1.0):
    """Log-softmax of a plain teacher forward over prompt + completion, at the completion positions: [n, V]."""
    ids = torch.tensor([prompt + completion])
    with torch.inference_mode():
        logits = model(ids).logits[0, len(prompt) - 1 : len(prompt) - 1 + len(completion)]
    return logits


def test_token_logprobs_equal_a_teacher_forward(tiny_teacher, tiny_tokenizer, make_prompts):
    prompts = make_prompts(4)
    # Sampled with a filtered, sharpened distribution; logprobs are still the plain teacher's.
    for r in run(tiny_teacher, prompts, temperature=0.7, top_k=10, top_p=0.9):
        logits = teacher_logprobs(tiny_teacher, prompts[r.prompt_index], r.completion_ids)
        expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(r.completion_ids)[:, None]).squeeze(-1)
        torch.testing.assert_close(torch.tensor(r.token_logprobs), expected, atol=1e-5, rtol=0)


def test_soft_topk_equals_a_teacher_forward(tiny_teacher, tiny_tokenizer, make_prompts):
    prompts = make_prompts(4)
    results = run(tiny_teacher, prompts, soft_topk=5, soft_temperature=2.0, eos_token_id=11)
    for r in results:
        n = len(r.completion_ids)
        assert r.topk_ids.shape == (n, 5) and r.topk_logprobs.shape == (n, 5) and r.tail_logprob.shape == (n,)
        logits = teacher_logprobs(tiny_teacher, prompts[r.prompt_index], r.completion_ids)
        expected = topk_targets_from_logits(logits[None], 5, 2.0)
        assert torch.equal(r.topk_ids, expected.ids[0])
        torch.testing.assert_close(r.topk_logprobs, expected.logprobs[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(r.tail_logprob, expected.tail_logprob[0], atol=1e-5, rtol=0)
    assert all(r.topk_ids is None for r in run(tiny_teacher, prompts))


def test_refuses_bad_input(tiny_teacher):
    with pytest.raises(ValueError, match="empty"):
        run(tiny_teacher, [[1, 2], []])
    with pytest.raises(ValueError, match="positions"):
        run(tiny_teacher, [[1] * 250], max_new_tokens=10)
    with pytest.raises(ValueError, match="static_cache"):
        run(tiny_teacher, [[1, 2]], compile=True)
    assert run(tiny_teacher, []) == []


def test_buckets_and_left_padding():
    from distill_core.teacher.decode import left_pad, length_buckets

    assert length_buckets([3, 1, 4, 1, 5], 2) == [[4, 2], [0, 1], [3]]
    batch = left_pad([[7, 8, 9], [5]], PAD, "cpu")
    assert batch.input_ids.tolist() == [[7, 8, 9], [PAD, PAD, 5]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch.position_ids.tolist() == [[0, 1, 2], [0, 0, 0]]
    assert batch.lengths.tolist() == [3, 1]
