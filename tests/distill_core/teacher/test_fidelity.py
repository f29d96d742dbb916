import pytest
import torch

from distill_core.config import DataConfig, TopKConfig
from distill_core.data import prepare_data, read_sequences
from distill_core.storage import Storage
from distill_core.teacher.fidelity import fidelity_markdown, fidelity_report


@pytest.fixture
def sample(tmp_path, tiny_tokenizer):
    storage = Storage(str(tmp_path / "root"))
    data = prepare_data(DataConfig(seq_len=24, rows_per_shard=8, max_documents=12, max_train_sequences=8), tiny_tokenizer, "tok", storage)
    _, seq_ids, input_ids = next(read_sequences(storage, data.train))
    return seq_ids, input_ids


def test_fidelity_report_measures_each_strategy(sample, tiny_teacher):
    seq_ids, input_ids = sample
    cfg = TopKConfig(strategy="hybrid", k=8, draws=16, batch_size=3)
    report = fidelity_report(tiny_teacher, seq_ids, input_ids, cfg, total_positions=10_000)
    assert report["positions"] == 8 * 23
    s = report["strategies"]
    assert [n for n, v in s.items() if v["configured"]] == ["hybrid"]
    assert s["topk"]["kept_ids_per_position"] == 8 and s["hybrid"]["kept_ids_per_position"] > 8
    # the top-k renormalised is off from the teacher by exactly −log(its mass), up to the codec's rounding
    assert 0 < report["tail_mass"]["p50"] < 1
    assert s["topk"]["kl_stored_to_teacher"] > 0
    for v in s.values():
        assert v["projected_bytes"] == pytest.approx(v["bytes_per_token"] * 10_000, rel=1e-6, abs=1)
    text = fidelity_markdown(report)
    assert "| hybrid (configured) |" in text and "Teacher mass outside its top-8" in text


def test_fidelity_of_the_top_k_is_the_log_of_its_mass(sample, tiny_teacher):
    seq_ids, input_ids = sample
    report = fidelity_report(tiny_teacher, seq_ids, input_ids, TopKConfig(k=8), total_positions=1)
    with torch.no_grad():
        log_p = torch.log_softmax(tiny_teacher(torch.from_numpy(input_ids)).logits[:, :-1].double(), -1)
    # KL(renormalised top-k ‖ p) = −log(mass of the top-k), per position
    expected = -torch.logsumexp(log_p.topk(8, -1).values, -1).mean().item()
    assert report["strategies"]["topk"]["kl_stored_to_teacher"] == pytest.approx(expected, abs=5e-3)
