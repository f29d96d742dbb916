"""Sequence-level KD and distilled beam search through the nightly flow, on the tiny teacher."""

import json

import pytest

from distill_core.cache.ref import CacheRef
from distill_core.config import parse_config
from distill_core.errors import CacheError
from distill_core.storage import Storage
from flows.nightly import nightly
from flows.stages import cache_samples_flow


def _config(tiny_config, losses, **extra):
    raw = tiny_config.model_dump(mode="json")
    raw["train"]["losses"] = losses
    raw.update(extra)
    return parse_config(raw)


def test_seqkd_and_beam_ranking_end_to_end(tiny_config, tmp_path):
    config = _config(tiny_config, [
        {"name": "seqkd", "weight": 0.3},
        {"name": "forward_kl", "on": "samples", "weight": 0.2},
        {"name": "beam_top1", "weight": 0.2},
        {"name": "beam_rank", "weight": 0.1},
        {"name": "ce", "weight": 0.2},
    ], samples={"prompt_len": 8, "num_prompts": 8, "num_samples": 2, "max_new_tokens": 6, "soft_topk": 4, "batch_size": 4},
        beams={"prompt_len": 8, "num_prompts": 8, "num_beams": 3, "max_new_tokens": 5, "batch_size": 4},
        eval={"max_sequences": 8, "batch_size": 4, "speed_tokens": 64, "prompts": 4, "prompt_len": 8, "max_new_tokens": 5})
    result = nightly(config, run_id="gen-1")
    root = tmp_path / "root"
    stages = root / "runs/gen-1/stages"
    assert not (stages / "cache_topk.json").exists()  # no term trains on data top-k
    samples, beams = (json.loads((stages / f"cache_{k}.json").read_text()) for k in ("samples", "beams"))
    assert samples["meta"]["soft_topk"] == 4 and beams["meta"]["num_beams"] == 3
    history = json.loads((stages / "train_student.json").read_text())["student"]["history"][-1]
    assert {"seqkd", "forward_kl@samples", "beam_top1", "beam_rank", "ce"} <= set(history)
    metrics = result["metrics"]
    for name in ("teacher", "student", "baseline"):
        assert metrics[name]["teacher_nll"] > 0 and 0 < metrics[name]["distinct_1"] <= 1
        assert len(metrics[name]["examples"]) == 3
    for name in ("student", "baseline"):
        assert 0 <= metrics[name]["selection_agreement"] <= 1 and -1 <= metrics[name]["kendall_tau"] <= 1
    assert result["registered"]["version"] == 1

    again = nightly(config, run_id="gen-2")  # everything cached: same student, same version
    assert again["registered"]["version"] == 1


def test_damaged_sample_shard_is_recomputed_on_request(tiny_config, tmp_path):
    config = _config(tiny_config, [{"name": "seqkd"}, {"name": "ce"}],
                     samples={"prompt_len": 8, "num_prompts": 20, "num_samples": 1, "max_new_tokens": 4, "batch_size": 8})
    nightly(config, run_id="dmg")
    root = tmp_path / "root"
    ref = json.loads((root / "runs/dmg/stages/cache_samples.json").read_text())
    store_path = root / ref["folder"]
    before = {p.name: p.read_bytes() for p in store_path.glob("part-*.parquet")}
    victim = sorted(before)[1]
    (store_path / victim).write_bytes(before[victim][:-7])
    with pytest.raises(CacheError, match="checksum"):
        CacheRef.from_dict(ref).open(Storage(str(root))).read_shard(victim)
    cache_samples_flow(run_id="dmg", config=config, recompute_damaged=True)
    after = {p.name: p.read_bytes() for p in store_path.glob("part-*.parquet")}
    assert after == before  # the damaged shard is recomputed, byte for byte; the others untouched
