import base64

import numpy as np
import pyarrow as pa

from distill_core.cache.shards import ShardStore, list_array
from distill_core.report import RunSummary, StoreSize, gather, loss_table, markdown_report
from distill_core.run_record import RunRecord
from distill_core.storage import Storage

PNG = b"\x89PNG\r\n\x1a\n not really"
METRICS = {
    "teacher": {"val_ppl": 10.0, "top1_agreement": 1.0, "params": 1000},
    "student": {"val_ppl": 20.0, "top1_agreement": 0.5, "kl_to_teacher": 0.25, "params": 250},
    "baseline": {"val_ppl": 25.0, "top1_agreement": 0.4, "params": 250},
}


def test_markdown_report_compares_models_and_shows_sizes_timings_and_curves():
    summary = RunSummary(
        run_id="night-7", teacher="path:gpt2-xl", data_fingerprint="abc", metrics=METRICS,
        registered={"name": "tiny", "version": 3, "url": "/root/registry/tiny/3", "champion": True},
        sizes=[StoreSize("topk cache", "caches/topk/f", rows=10, bytes=4000, tokens=100)],
        loss_curves={"student": "/root/students/f/student/loss_curve.png", "baseline": "s3://b/students/f/baseline/loss_curve.png"},
        train_seconds={"student": 12.5, "baseline": 8.0}, loss_curve_pngs={"student": PNG}, resumed_from={"baseline": 4},
    )
    md = markdown_report(summary, {"prepare-data": {"seconds": 1.5, "state": "Completed"}})
    assert "Registered **tiny v3** — the new **champion**" in md
    assert "| student | 20 | 0.5 | 0.25 | 250 |" in md
    assert "2.00× the teacher's" in md and "-20.0% against the CE-only baseline (distillation helps)" in md
    assert "25.0% of the teacher's parameters" in md
    assert "| topk cache | 10 | 100 | 4,000 | 40 | `caches/topk/f` |" in md
    assert "| prepare-data | 1.5 | Completed |" in md and "| training loop (student) | 12.5 | |" in md
    assert "| training loop (baseline) | 8 | resumed from step 4 |" in md
    # the curve is in the Markdown itself (a browser cannot open file:// links to the worker's disk)
    assert f"![student loss curve](data:image/png;base64,{base64.b64encode(PNG).decode()})" in md
    assert "file://" not in md and "**student** (loss_curve.png at `/root/students/f/student/loss_curve.png`)" in md
    assert "**baseline** (loss_curve.png at `s3://b/students/f/baseline/loss_curve.png`)" in md
    assert md.count("data:image/png") == 1  # the baseline's PNG was not read: no image, only its location


def test_markdown_report_shows_intervals_and_the_share_of_the_gap_closed():
    ci = {
        "teacher": {**METRICS["teacher"], "val_ppl_low": 9.5, "val_ppl_high": 10.5, "val_sequences": 64},
        "student": {**METRICS["student"], "val_ppl_low": 18.0, "val_ppl_high": 22.0,
                    "ppl_ratio_vs_teacher": 2.0, "ppl_ratio_vs_teacher_low": 1.9, "ppl_ratio_vs_teacher_high": 2.1,
                    "ppl_ratio_vs_baseline": 0.8, "ppl_ratio_vs_baseline_low": 0.75, "ppl_ratio_vs_baseline_high": 0.85,
                    "kd_gap_closed": 0.24, "kd_gap_closed_low": 0.2, "kd_gap_closed_high": 0.3,
                    "per_sequence": {"seq_id": [0], "nll": [1.0], "tokens": [1]}},
        "baseline": {**METRICS["baseline"], "val_ppl_low": 23.0, "val_ppl_high": 27.0},
    }
    md = markdown_report(RunSummary("r", "", "", ci, None, [], {}))
    assert "| model | val_ppl [95% CI] | top1_agreement |" in md
    assert "| student | 20 [18, 22] | 0.5 | 0.25 | 250 |" in md and "| teacher | 10 [9.5, 10.5] |" in md
    assert "2.00× the teacher's (95% CI 1.90× to 2.10×)" in md
    assert "-20.0% (95% CI -25.0% to -15.0%) against the CE-only baseline (distillation helps: the interval excludes 0)" in md
    assert "distillation closes 24% (95% CI 20% to 30%) of the baseline-to-teacher gap in log perplexity" in md
    assert "bootstrap over 64 validation sequences" in md and "per_sequence" not in md

    unclear = {**ci, "student": {**ci["student"], "ppl_ratio_vs_baseline_high": 1.05, "kd_gap_closed": None}}
    md = markdown_report(RunSummary("r", "", "", unclear, None, [], {}))
    assert "(no clear difference: the interval includes 0)" in md
    assert "gap closed: undefined (the teacher is not clearly better than the baseline" in md
    worse = {**ci, "student": {**ci["student"], "ppl_ratio_vs_baseline_low": 1.02, "ppl_ratio_vs_baseline_high": 1.1}}
    assert "(distillation hurts: the interval excludes 0)" in markdown_report(RunSummary("r", "", "", worse, None, [], {}))

    calibrated = {**ci, "student": {**ci["student"], "ece": 0.016, "ece_low": 0.012, "ece_high": 0.021, "ece_vs_baseline": -0.024,
                                    "ece_vs_baseline_low": -0.03, "ece_vs_baseline_high": -0.018},
                  "baseline": {**ci["baseline"], "ece": 0.04}}
    md = markdown_report(RunSummary("r", "", "", calibrated, None, [], {}))
    assert "| ece [95% CI] |" in md and "| 0.016 [0.012, 0.021] |" in md and "| 0.04 |" in md
    assert "student ECE 0.016 vs the baseline's 0.040: -0.024 (95% CI -0.030 to -0.018) (below 0: better calibrated)" in md


def test_unfinished_run_says_what_is_missing():
    md = markdown_report(RunSummary("r", "", "", {}, None, [], {}))
    assert "Not registered" in md and "No metrics yet" in md and "No loss curve yet" in md


def test_gather_reads_the_run_record_and_manifests(tmp_path):
    storage = Storage(str(tmp_path))
    rows = lambda n: pa.table({"seq_id": pa.array(np.arange(n), pa.int64()),  # noqa: E731
                               "input_ids": list_array(np.zeros((n, 8), np.uint16), pa.uint16())})
    for split, n in (("train", 6), ("validation", 2)):
        ShardStore(storage, f"data/d/{split}", "data", "d", {}).write_shard("part-0.parquet", rows(n))
    cache = {"kind": "topk", "folder": "caches/topk/c", "fingerprint": "c", "meta": {"seq_len": 8, "k": 4}}
    ShardStore(storage, cache["folder"], "topk", "c", cache["meta"]).write_shard("part-a.parquet", rows(6))
    storage.write_bytes("students/s/student/loss_curve.png", PNG)
    record = RunRecord(storage, "night-1")
    record.write_stage("teacher", {"source": "path:tiny", "fingerprint": "t"})
    record.write_stage("prepare_data", {"folder": "data/d", "fingerprint": "d", "seq_len": 8})
    record.write_stage("cache_topk", cache)
    record.write_stage("train_student", {"student": {"model_folder": "students/s/student/model", "seconds": 3.0,
                                                     "resumed_from_step": 50}})
    record.write_stage("evaluate", METRICS)

    summary = gather(storage, "night-1")
    sizes = {s.label: s for s in summary.sizes}
    assert set(sizes) == {"data (train)", "data (validation)", "topk cache"}
    assert sizes["data (train)"].tokens == 48 and sizes["topk cache"].tokens == 6 * 7  # T-1 positions per row
    assert sizes["topk cache"].bytes_per_token == sizes["topk cache"].bytes / 42
    assert summary.loss_curves == {"student": storage.url("students/s/student/loss_curve.png")}
    assert summary.loss_curve_pngs == {"student": PNG} and summary.resumed_from == {"student": 50}
    assert summary.metrics == METRICS and summary.registered is None and summary.train_seconds == {"student": 3.0}


def test_loss_table_thins_long_histories_and_keeps_both_ends():
    history = [{"step": i + 1, "lr": 3e-4, "loss": 1 / (i + 1)} for i in range(1000)]
    table = loss_table(history, max_rows=10)
    assert [r["step"] for r in table] == [1, 112, 223, 334, 445, 556, 667, 778, 889, 1000]
    assert table[1] == {"step": 112, "lr": 3e-4, "loss": 0.00892857}
    assert loss_table(history[:3]) == [{"step": 1, "lr": 3e-4, "loss": 1.0}, {"step": 2, "lr": 3e-4, "loss": 0.5},
                                       {"step": 3, "lr": 3e-4, "loss": 0.333333}]
