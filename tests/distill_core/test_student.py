"""Student construction: layer choice, surgery on GPT-2 / Llama / Qwen2, fresh and pretrained students."""

from __future__ import annotations

import pytest
import torch

from distill_core.config import StudentConfig
from distill_core.errors import TeacherError
from distill_core.student import (
    build_student,
    check_vocab,
    count_parameters,
    student_from_config,
    student_from_pretrained,
    student_from_teacher_layers,
    teacher_layer_indices,
)
from distill_core.teacher.load import tokenizer_hash


def _block_state(model, prefix: str, index: int) -> dict[str, torch.Tensor]:
    head = f"{prefix}.{index}."
    return {k[len(head):]: v for k, v in model.state_dict().items() if k.startswith(head)}


def _assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def _tiny_gpt2(vocab_size: int, layers: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_positions=64, n_embd=32, n_layer=layers, n_head=2)).eval()


def _tiny_llama(vocab_size: int = 96, layers: int = 4):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize(
    ("num_layers", "every_k", "expected"),
    [
        (30, 6, [0, 6, 12, 18, 24, 29]),
        (30, 5, [0, 5, 10, 15, 20, 25, 29]),
        (12, 2, [0, 2, 4, 6, 8, 10, 11]),
        (4, 1, [0, 1, 2, 3]),
        (4, 10, [0, 3]),
        (1, 3, [0]),
    ],
)
def test_teacher_layer_indices(num_layers, every_k, expected):
    assert teacher_layer_indices(num_layers, every_k) == expected


def test_teacher_layer_indices_rejects_bad_arguments():
    with pytest.raises(ValueError):
        teacher_layer_indices(4, 0)


def test_gpt2_surgery_copies_the_chosen_blocks(tiny_teacher):
    student = student_from_teacher_layers(tiny_teacher, [0, 3]).eval()

    assert student.config.n_layer == 2 and len(student.transformer.h) == 2
    _assert_same_tensors(_block_state(student, "transformer.h", 0), _block_state(tiny_teacher, "transformer.h", 0))
    _assert_same_tensors(_block_state(student, "transformer.h", 1), _block_state(tiny_teacher, "transformer.h", 3))
    for name in ("transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight", "lm_head.weight"):
        torch.testing.assert_close(student.state_dict()[name], tiny_teacher.state_dict()[name], rtol=0, atol=0)
    assert student.transformer.h[1].mlp.c_fc.weight.data_ptr() != tiny_teacher.transformer.h[3].mlp.c_fc.weight.data_ptr()
    assert student.lm_head.weight.data_ptr() == student.transformer.wte.weight.data_ptr()  # still tied

    ids = torch.randint(0, tiny_teacher.config.vocab_size, (2, 8))
    with torch.no_grad():
        assert student(ids).logits.shape == (2, 8, tiny_teacher.config.vocab_size)


def test_keeping_every_layer_reproduces_the_teacher(tiny_teacher):
    student = student_from_teacher_layers(tiny_teacher, [0, 1, 2, 3]).eval()
    ids = torch.randint(0, tiny_teacher.config.vocab_size, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(student(ids).logits, tiny_teacher(ids).logits, rtol=0, atol=0)


def test_llama_surgery_reindexes_layers_and_runs():
    teacher = _tiny_llama()
    student = student_from_teacher_layers(teacher, [1, 3]).eval()

    assert student.config.num_hidden_layers == 2
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1]
    _assert_same_tensors(_block_state(student, "model.layers", 0), _block_state(teacher, "model.layers", 1))
    _assert_same_tensors(_block_state(student, "model.layers", 1), _block_state(teacher, "model.layers", 3))
    ids = torch.randint(0, 96, (2, 8))
    with torch.no_grad():
        out = student(ids, use_cache=True)
        assert out.logits.shape == (2, 8, 96)
        assert student.generate(ids[:, :4], max_new_tokens=3, do_sample=False).shape == (2, 7)
        full = student_from_teacher_layers(teacher, [0, 1, 2, 3]).eval()
        torch.testing.assert_close(full(ids).logits, teacher(ids).logits, rtol=0, atol=0)


def test_surgery_subsets_per_layer_config():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, use_sliding_window=True, sliding_window=4, max_window_layers=2,
    )
    teacher = Qwen2ForCausalLM(config).eval()
    student = student_from_teacher_layers(teacher, [0, 3]).eval()
    assert student.config.layer_types == ["full_attention", "sliding_attention"]
    with torch.no_grad():
        assert student(torch.randint(0, 96, (1, 8))).logits.shape == (1, 8, 96)


def test_surgery_rejects_layers_outside_the_teacher(tiny_teacher):
    with pytest.raises(TeacherError, match=r"\[0, 4\].*4 layers \(indices 0\.\.3\)"):
        student_from_teacher_layers(tiny_teacher, [0, 4])


def test_build_student_from_teacher_layers_keeps_every_kth(tiny_teacher):
    student = build_student(tiny_teacher, StudentConfig(every_k=2), seed=0)
    assert student.config.n_layer == 3  # layers 0, 2, 3
    _assert_same_tensors(_block_state(student, "transformer.h", 1), _block_state(tiny_teacher, "transformer.h", 2))


def test_build_student_from_config_is_seeded(tiny_teacher):
    cfg = StudentConfig(init="config", num_layers=2)
    a, b, c = (build_student(tiny_teacher, cfg, seed=s) for s in (0, 0, 1))

    assert a.config.n_layer == 2 and a.config.vocab_size == tiny_teacher.config.vocab_size
    _assert_same_tensors(a.state_dict(), b.state_dict())
    assert not torch.equal(a.transformer.h[0].mlp.c_fc.weight, c.transformer.h[0].mlp.c_fc.weight)
    assert count_parameters(a) < count_parameters(tiny_teacher)


def test_student_from_config_subsets_per_layer_settings():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, use_sliding_window=True, sliding_window=4, max_window_layers=2,
    )
    student = student_from_config(Qwen2ForCausalLM(config), num_layers=3)
    assert student.config.num_hidden_layers == 3 and len(student.model.layers) == 3
    assert student.config.layer_types == ["full_attention", "full_attention", "sliding_attention"]


def test_pretrained_student_must_share_the_vocabulary(tmp_path, tiny_teacher, tiny_teacher_dir, tiny_tokenizer):
    other = tmp_path / "other"
    _tiny_gpt2(vocab_size=500, layers=2).save_pretrained(other)
    with pytest.raises(TeacherError, match="500 tokens but the teacher has 384.*shares the teacher's tokenizer"):
        student_from_pretrained(str(other), teacher_vocab_size=384)

    same = student_from_pretrained(str(tiny_teacher_dir), 384, tokenizer_hash(tiny_tokenizer))
    check_vocab(same, tiny_teacher)
    with pytest.raises(TeacherError, match="another tokenizer"):
        student_from_pretrained(str(tiny_teacher_dir), 384, "0" * 16)


def test_check_vocab_rejects_a_different_vocabulary(tiny_teacher):
    with pytest.raises(TeacherError, match=r"student vocabulary \(500 tokens\) differs from the teacher's \(384\)"):
        check_vocab(_tiny_gpt2(vocab_size=500, layers=1), tiny_teacher)


def test_count_parameters_counts_tied_weights_once(tiny_teacher):
    unique = {id(p): p.numel() for p in tiny_teacher.parameters()}
    assert count_parameters(tiny_teacher) == sum(unique.values())
    assert count_parameters(tiny_teacher) < sum(v.numel() for v in tiny_teacher.state_dict().values())


def test_pretrained_student_saved_without_its_tokenizer_is_refused(tmp_path, tiny_tokenizer):
    bare = tmp_path / "bare"
    _tiny_gpt2(vocab_size=384, layers=1).save_pretrained(bare)
    with pytest.raises(TeacherError, match=f"student {bare}: the tokenizer has 1 token for a model of 384.*save it beside the model"):
        student_from_pretrained(str(bare), 384, tokenizer_hash(tiny_tokenizer))


def test_embedding_rows_copy_spell_or_mean():
    from distill_core.student import embedding_rows

    teacher_table = [b"<eos>", b"a", b"b", b"ab", b"c"]
    rows = torch.arange(10.0).view(5, 2)  # row i = [2i, 2i+1]
    student_table = [b"<eos>", b"abc", b"ba", b"z", b"c", b""]
    out, counts = embedding_rows(teacher_table, student_table, rows)
    assert counts == {"copied": 2, "spelled": 2, "mean": 2}
    assert out[0].tolist() == [0.0, 1.0]  # same string: copied
    assert out[1].tolist() == ((rows[3] + rows[4]) / 2).tolist()  # "ab" + "c"
    assert out[2].tolist() == ((rows[2] + rows[1]) / 2).tolist()  # "b" + "a"
    assert out[3].tolist() == rows.mean(0).tolist() == out[5].tolist()  # nothing spells "z"; b"" spells nothing
    assert out[4].tolist() == rows[4].tolist()


def test_teacher_layers_student_with_its_own_vocabulary(tiny_teacher, tiny_tokenizer, small_tokenizer):
    from distill_core.config import StudentConfig
    from distill_core.student import build_student, vocab_rows
    from distill_core.tokens import token_bytes

    student = build_student(tiny_teacher, StudentConfig(init="teacher_layers", layers=[0, 3]), seed=0,
                            tokenizers=(tiny_tokenizer, small_tokenizer))
    assert vocab_rows(student) == 300 == student.config.vocab_size
    assert student.config.eos_token_id == small_tokenizer.eos_token_id
    t_table, s_table = token_bytes(tiny_tokenizer), token_bytes(small_tokenizer)
    s = next(i for i, b in enumerate(s_table) if len(b) > 2 and b in t_table)
    t = t_table.index(s_table[s])
    assert torch.equal(student.get_input_embeddings().weight[s], tiny_teacher.get_input_embeddings().weight[t])
    assert torch.equal(student.lm_head.weight, student.get_input_embeddings().weight)  # still tied
    ids = torch.tensor([small_tokenizer("def f(x): return x")["input_ids"]])
    assert student(input_ids=ids).logits.shape == (1, ids.shape[1], 300)

    fresh = build_student(tiny_teacher, StudentConfig(init="config", num_layers=1), seed=0, tokenizers=(tiny_tokenizer, small_tokenizer))
    assert vocab_rows(fresh) == 300
