"""The whole nightly flow on the embedded real teacher (SmolLM2-135M-Instruct from its GGUF file)."""

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill_core.config import parse_config
from flows.nightly import nightly


@pytest.mark.slow
def test_nightly_on_the_embedded_gguf_teacher(tmp_path):
    config = parse_config({
        "storage": {"root": str(tmp_path / "root")},
        "teacher": {"kind": "gguf", "file": "embedded"},
        "data": {"seq_len": 64, "max_train_sequences": 16, "max_validation_sequences": 4, "rows_per_shard": 8},
        "topk": {"k": 8, "batch_size": 8},
        "student": {"init": "teacher_layers", "every_k": 10},
        "train": {"steps": 3, "batch_size": 2, "warmup_steps": 1, "checkpoint_every": 2},
        "eval": {"max_sequences": 4, "batch_size": 4, "speed_tokens": 64},
        "registry": {"name": "smollm2-e2e"},
    })
    result = nightly(config, run_id="real-teacher")
    metrics = result["metrics"]
    assert metrics["teacher"]["params"] > 100e6
    assert metrics["teacher"]["val_ppl"] < 100  # real weights: a random 49k-vocabulary model scores ~5e4
    assert metrics["student"]["params"] < 0.6 * metrics["teacher"]["params"]
    assert metrics["student"]["val_ppl"] > metrics["teacher"]["val_ppl"]
    url = result["registered"]["url"]
    model = AutoModelForCausalLM.from_pretrained(url)
    assert model.config.num_hidden_layers == 4  # layers 0, 10, 20, 29 of 30
    tokenizer = AutoTokenizer.from_pretrained(url)
    assert tokenizer("def f(x):")["input_ids"]
