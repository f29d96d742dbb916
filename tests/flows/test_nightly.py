import json

from transformers import AutoModelForCausalLM

from distill_core.registry import get_version, list_versions
from distill_core.storage import Storage
from flows.nightly import nightly


def _files(root):
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_nightly_end_to_end_then_rerun_recomputes_nothing(tiny_config, tmp_path):
    result = nightly(tiny_config, run_id="night-1")
    metrics = result["metrics"]
    assert set(metrics) == {"teacher", "student", "baseline"}
    assert metrics["student"]["params"] < metrics["teacher"]["params"]
    assert 0.0 <= metrics["student"]["top1_agreement"] <= 1.0
    student = metrics["student"]
    assert student["val_ppl_low"] <= student["val_ppl"] <= student["val_ppl_high"]
    assert student["ppl_ratio_vs_baseline_low"] <= student["ppl_ratio_vs_baseline"] <= student["ppl_ratio_vs_baseline_high"]
    assert "kd_gap_closed" in student and "ppl_ratio_vs_teacher" in metrics["baseline"]
    registered = result["registered"]
    assert registered["version"] == 1 and registered["champion"]
    model = AutoModelForCausalLM.from_pretrained(registered["url"])
    assert model.config.n_layer == 2

    root = tmp_path / "root"
    stages = json.loads((root / "runs/night-1/stages/cache_topk.json").read_text())
    assert stages["meta"]["k"] == 8
    evaluated = json.loads((root / "runs/night-1/stages/evaluate.json").read_text())
    assert {name: len(m["per_sequence"]["nll"]) for name, m in evaluated.items()} == {"teacher": 8, "student": 8, "baseline": 8}
    assert get_version(Storage(str(root)), "tiny", 1)["metrics"]["val_ppl_high"] == student["val_ppl_high"]
    trained = json.loads((root / "runs/night-1/stages/train_student.json").read_text())["student"]["model_folder"]
    weights = (root / trained / "model.safetensors").stat()
    assert weights.st_nlink == 2 and (root / "registry/tiny/1/model.safetensors").stat().st_ino == weights.st_ino  # linked, not copied
    before = {k: v for k, v in _files(root).items() if not k.startswith("runs/")}
    again = nightly(tiny_config, run_id="night-2")
    after = {k: v for k, v in _files(root).items() if not k.startswith("runs/")}
    assert after == before  # no data, cache, student or registry file was rewritten
    assert again["registered"]["version"] == 1
    assert len(list_versions(Storage(str(root)), "tiny")) == 1


def test_a_deleted_storage_root_is_rebuilt_not_served_from_prefect_cache(tiny_config, tmp_path):
    import shutil

    nightly(tiny_config, run_id="before")
    shutil.rmtree(tmp_path / "root")
    result = nightly(tiny_config, run_id="after")  # Prefect's cached refs point into the old root
    assert result["registered"]["version"] == 1
    assert AutoModelForCausalLM.from_pretrained(result["registered"]["url"]).config.n_layer == 2


def test_nightly_with_a_pruned_student_registers_its_shape_and_lineage(tiny_config, tmp_path):
    config = tiny_config.model_copy(update={"student": tiny_config.student.model_validate(
        {"init": "pruned", "num_layers": 3, "intermediate_size": 64, "calibration_sequences": 8})})
    result = nightly(config, run_id="pruned-1")
    model = AutoModelForCausalLM.from_pretrained(result["registered"]["url"])
    assert (model.config.n_layer, model.config.n_inner) == (3, 64)
    entry = json.loads((tmp_path / "root/registry/tiny/1/entry.json").read_text())
    init = entry["lineage"]["init"]
    assert init["init"] == "pruned" and init["shape"]["intermediate_size"] == 64 and len(init["shape"]["layers"]) == 3
    assert len(init["importance"]["block_influence"]) == 4 and init["params"] == sum(p.numel() for p in model.parameters())
    plans = list((tmp_path / "root/pruning").glob("*/plan.json"))
    assert len(plans) == 1  # the KD student and its CE-only baseline share one plan
    mtime = plans[0].stat().st_mtime_ns
    nightly(config, run_id="pruned-2")
    assert plans[0].stat().st_mtime_ns == mtime
