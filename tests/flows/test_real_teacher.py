"""The whole nightly flow on the embedded real teacher (SmolLM2-135M-Instruct from its GGUF file)."""

import json

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
        "student": {"init": "pruned", "num_layers": 4, "intermediate_size": 256, "num_key_value_heads": 2,
                    "calibration_sequences": 8},
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
    assert (model.config.num_hidden_layers, model.config.intermediate_size) == (4, 256)
    assert (model.config.num_attention_heads, model.config.num_key_value_heads, model.config.head_dim) == (6, 2, 64)
    init = json.loads((tmp_path / "root/registry/smollm2-e2e/1/entry.json").read_text())["lineage"]["init"]
    influence = init["importance"]["block_influence"]
    assert len(influence) == 30 and max(influence) == influence[0]  # the first layer turns the embeddings most
    assert init["shape"]["layers"][0] == 0 and init["shape"]["layers"][-1] == 29
    tokenizer = AutoTokenizer.from_pretrained(url)
    assert tokenizer("def f(x):")["input_ids"]
