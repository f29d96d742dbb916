"""A nightly run whose student has its own tokenizer (another vocabulary than the teacher's)."""

import json

import numpy as np
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill_core.config import parse_config
from flows.nightly import nightly


def test_nightly_with_a_student_of_another_vocabulary(tiny_config, tmp_path, small_tokenizer):
    small_tokenizer.save_pretrained(tmp_path / "small")
    raw = tiny_config.model_dump()
    raw["student"]["tokenizer"] = str(tmp_path / "small")
    raw["train"]["losses"] = [{"name": "forward_kl", "weight": 0.5}, {"name": "uld", "weight": 0.5}, {"name": "ce", "weight": 0.5},
                              {"name": "seqkd", "weight": 0.25}, {"name": "beam_rank", "weight": 0.25},
                              {"name": "forward_kl", "on": "samples", "weight": 0.25}]  # text-level terms, re-tokenised
    raw["samples"] = {"prompt_len": 8, "num_prompts": 8, "num_samples": 1, "max_new_tokens": 6, "batch_size": 8, "soft_topk": 4}
    raw["beams"] = {"prompt_len": 8, "num_prompts": 8, "num_beams": 3, "max_new_tokens": 5, "batch_size": 4}
    config = parse_config(raw)
    result = nightly(config, run_id="xtok-1")
    metrics = result["metrics"]
    trained = json.loads((tmp_path / "root/runs/xtok-1/stages/train_student.json").read_text())["student"]
    assert {"seqkd", "beam_rank", "forward_kl", "uld", "forward_kl@samples"} <= set(trained["history"][-1])
    assert np.isfinite(trained["history"][-1]["loss"]) and trained["history"][-1]["forward_kl@samples"] > 0
    assert set(metrics) == {"teacher", "student", "baseline"}
    for name in ("teacher", "student", "baseline"):
        assert metrics[name]["unit"] == "byte" and 0 < metrics[name]["val_bpb"] < 16
    student = metrics["student"]
    assert student["ppl_ratio_vs_baseline_low"] <= student["ppl_ratio_vs_baseline"] <= student["ppl_ratio_vs_baseline_high"]

    folder = result["registered"]["url"]
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model.config.vocab_size == len(tokenizer) == len(small_tokenizer) == 300
    assert tokenizer.get_vocab() == small_tokenizer.get_vocab()
    ids = tokenizer("def f(x):", return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert out.shape[1] == ids.shape[1] + 5
    assert tokenizer.decode(out[0]).startswith("def f(x):")
