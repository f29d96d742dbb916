"""The per-run report: metrics of teacher, student and baseline, storage sizes, timings, loss curves.

Loss curves are embedded as ``data:`` URIs (base64 PNG), so the Prefect UI shows them wherever it runs;
the PNG files beside the models stay where training wrote them.

:func:`gather` reads what a run left under the storage root (its run record and the manifests it
points at); :func:`markdown_report` turns that plus per-stage timings into Markdown. Both are plain
Python: the Prefect task in ``tasks/report.py`` publishes the Markdown as an artifact.
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass, field
from typing import Any

from distill_core.cache.shards import read_manifest
from distill_core.run_record import RunRecord
from distill_core.storage import Storage

METRIC_COLUMNS = ["val_ppl", "top1_agreement", "kl_to_teacher", "ece", "params", "cpu_tokens_per_s"]


@dataclass(frozen=True)
class StoreSize:
    """The committed size of one sharded dataset (data split or teacher cache)."""

    label: str
    folder: str
    rows: int
    bytes: int
    tokens: int | None  # token positions stored (None when rows are not token sequences)

    @property
    def bytes_per_token(self) -> float | None:
        return self.bytes / self.tokens if self.tokens else None


@dataclass(frozen=True)
class RunSummary:
    """Everything the report shows that lives in files (timings come from the orchestrator)."""

    run_id: str
    teacher: str
    data_fingerprint: str
    metrics: dict[str, dict[str, Any]]
    registered: dict[str, Any] | None
    sizes: list[StoreSize]
    loss_curves: dict[str, str]  # model name -> URL (or absolute local path) of its loss_curve.png
    train_seconds: dict[str, float] = field(default_factory=dict)
    loss_curve_pngs: dict[str, bytes] = field(default_factory=dict)  # model name -> the PNG itself
    resumed_from: dict[str, int] = field(default_factory=dict)  # model name -> checkpoint step its training resumed at
    rounds: list[dict] = field(default_factory=list)  # the on-policy rounds' records (train_round_<r>), in order


def store_size(storage: Storage, label: str, folder: str, tokens_per_row: int | None) -> StoreSize:
    shards = read_manifest(storage, folder)["shards"]
    rows = sum(s["rows"] for s in shards)
    return StoreSize(label, folder, rows, sum(s["bytes"] for s in shards),
                     rows * tokens_per_row if tokens_per_row else None)


def gather(storage: Storage, run_id: str) -> RunSummary:
    """Read a run's record and the manifests it points at; stages that have not finished are left out."""
    record = RunRecord(storage, run_id)
    stage = lambda name: record.read_stage(name) if record.has_stage(name) else None  # noqa: E731
    teacher, data = stage("teacher") or {}, stage("prepare_data")
    sizes = []
    if data:
        seq_len = data["seq_len"]
        sizes += [store_size(storage, f"data ({split})", f"{data['folder']}/{split}", seq_len)
                  for split in ("train", "validation")]
    for name in sorted(storage.listdir(f"{record.folder}/stages")):
        out = stage(name.removesuffix(".json"))
        if isinstance(out, dict) and {"kind", "folder", "meta"} <= set(out) and storage.exists(f"{out['folder']}/manifest.json"):
            # top-k targets exist for the T-1 positions that have a next token
            per_row = out["meta"]["seq_len"] - 1 if out["kind"] == "topk" and "seq_len" in out["meta"] else None
            sizes.append(store_size(storage, f"{out['kind']} cache", out["folder"], per_row))
    trained = stage("train_student") or {}
    curves, pngs, seconds, resumed = {}, {}, {}, {}
    for name, result in trained.items():
        curve = f"{result['model_folder'].rsplit('/', 1)[0]}/loss_curve.png"
        if storage.exists(curve):
            curves[name], pngs[name] = storage.url(curve), storage.read_bytes(curve)
        if isinstance(result.get("seconds"), (int, float)):
            seconds[name] = float(result["seconds"])
        if result.get("resumed_from_step"):
            resumed[name] = int(result["resumed_from_step"])
    rounds, r = [], 1
    while (done := stage(f"train_round_{r}")) is not None:
        rounds.append(done)
        r += 1
    return RunSummary(
        rounds=rounds, run_id=run_id, teacher=str(teacher.get("source", "")), data_fingerprint=str((data or {}).get("fingerprint", "")),
        metrics=stage("evaluate") or {}, registered=stage("register"), sizes=sizes, loss_curves=curves,
        train_seconds=seconds, loss_curve_pngs=pngs, resumed_from=resumed,
    )


def markdown_report(summary: RunSummary, timings: dict[str, dict[str, Any]] | None = None) -> str:
    """Markdown for one run. ``timings`` maps a stage to {"seconds": float, "state": str}."""
    s = summary
    lines = [f"# Distillation run `{s.run_id}`", ""]
    reg = s.registered
    if reg:
        champion = " — the new **champion**" if reg.get("champion") else ""
        lines.append(f"Registered **{reg['name']} v{reg['version']}**{champion} at `{reg['url']}`.")
    else:
        lines.append("Not registered (the register stage has not finished).")
    lines += ["", f"Teacher `{s.teacher or '?'}`, data `{s.data_fingerprint or '?'}`.", ""]

    lines += ["## Teacher vs student vs baseline", ""]
    if s.metrics:
        cols = [c for c in METRIC_COLUMNS if any(c in m for m in s.metrics.values())]
        header = [f"{c} [95% CI]" if c in _WITH_CI and any(f"{c}_low" in m for m in s.metrics.values()) else c for c in cols]
        lines += ["| model | " + " | ".join(header) + " |", "|---" * (len(cols) + 1) + "|"]
        for name in _model_order(s.metrics):
            lines.append(f"| {name} | " + " | ".join(_cell(s.metrics[name], c) for c in cols) + " |")
        lines += ["", *_comparisons(s.metrics)]
    else:
        lines.append("No metrics yet (the evaluate stage has not finished).")
    lines.append("")

    if s.rounds:
        lines += _rounds_table(s.rounds)
    lines += ["## Storage", "", "| artifact | rows | tokens | bytes | bytes/token | folder |", "|---|---|---|---|---|---|"]
    for size in s.sizes:
        lines.append(f"| {size.label} | {_fmt(size.rows)} | {_fmt(size.tokens)} | {_fmt(size.bytes)} | "
                     f"{_fmt(size.bytes_per_token)} | `{size.folder}` |")
    lines.append("")

    lines += ["## Timings", "", "| stage | seconds | state |", "|---|---|---|"]
    for stage, t in (timings or {}).items():
        lines.append(f"| {stage} | {_fmt(t.get('seconds'))} | {t.get('state', '')} |")
    for name, sec in s.train_seconds.items():
        resumed = f" resumed from step {s.resumed_from[name]} " if name in s.resumed_from else " "
        lines.append(f"| training loop ({name}) | {_fmt(sec)} |{resumed}|")
    lines.append("")

    lines += ["## Loss curves", ""]
    for name, url in s.loss_curves.items():
        lines += [f"**{name}** (loss_curve.png at `{url}`)", ""]
        if name in s.loss_curve_pngs:
            lines += [f"![{name} loss curve]({png_data_uri(s.loss_curve_pngs[name])})", ""]
    if not s.loss_curves:
        lines.append("No loss curve yet (the train_student stage has not finished).")
    return "\n".join(lines) + "\n"


def _rounds_table(rounds: list[dict]) -> list[str]:
    """Each on-policy round's metrics: the teacher's NLL per token of the samples the round trained on
    (written by the student after the round before), and the mean of each loss part over its steps."""
    parts = list(dict.fromkeys(k for r in rounds for k in r["metrics"] if not k.startswith("samples_")))
    lines = ["## On-policy rounds", "",
             "Teacher NLL: the teacher's mean NLL per token of the samples the round trained on (written by the "
             "student after the round before; lower is better). Loss parts: means over the round's steps.", "",
             "| round | steps to | teacher NLL of samples | sampled tokens | " + " | ".join(parts) + " | cache |",
             "|---" * (len(parts) + 5) + "|"]
    for r in rounds:
        m = r["metrics"]
        lines.append(f"| {r['round']} | {r['result']['steps']} | {_fmt(m.get('samples_teacher_nll'))} | "
                     f"{_fmt(m.get('samples_tokens'))} | " + " | ".join(_fmt(m.get(p)) for p in parts) +
                     f" | `{r['cache']['folder']}` |")
    return lines + [""]


def loss_table(history: list[dict], max_rows: int = 500) -> list[dict]:
    """At most ``max_rows`` evenly spaced records of a training history (first and last included),
    values rounded to 6 significant digits: the rows of the loss table shown in the UI. Every row has every
    column; a term a step did not train (a round's on-policy or other steps) is None there."""
    n = len(history)
    picked = history if n <= max_rows else [history[i * (n - 1) // (max_rows - 1)] for i in range(max_rows)]
    columns = list(dict.fromkeys(k for record in picked for k in record))
    return [{k: float(f"{v:.6g}") if isinstance(v, float) else v for k in columns for v in [record.get(k)]} for record in picked]


def _model_order(metrics: dict) -> list[str]:
    first = [m for m in ("teacher", "student", "baseline") if m in metrics]
    return first + sorted(set(metrics) - set(first))


def _comparisons(metrics: dict) -> list[str]:
    ppl = {name: m.get("val_ppl") for name, m in metrics.items() if _number(m.get("val_ppl"))}
    student = metrics.get("student", {})
    out = []
    if "student" in ppl and "teacher" in ppl:
        ci = _interval(student, "ppl_ratio_vs_teacher", lambda r: f"{r:.2f}×")
        out.append(f"- student perplexity is {ppl['student'] / ppl['teacher']:.2f}× the teacher's{ci}.")
    if "student" in ppl and "baseline" in ppl:
        delta = 100 * (ppl["student"] - ppl["baseline"]) / ppl["baseline"]
        low, high = student.get("ppl_ratio_vs_baseline_low"), student.get("ppl_ratio_vs_baseline_high")
        if _number(low) and _number(high):
            verdict = ("distillation helps: the interval excludes 0" if high < 1 else
                       "distillation hurts: the interval excludes 0" if low > 1 else
                       "no clear difference: the interval includes 0")
            ci = f" (95% CI {100 * (low - 1):+.1f}% to {100 * (high - 1):+.1f}%)"
        else:
            verdict, ci = ("distillation helps" if delta < 0 else "distillation does not help yet"), ""
        out.append(f"- student perplexity is {delta:+.1f}%{ci} against the CE-only baseline ({verdict}).")
        if "kd_gap_closed" in student:
            share = student["kd_gap_closed"]
            out.append(
                f"- distillation closes {share:.0%}{_interval(student, 'kd_gap_closed', lambda v: f'{v:.0%}')} of the "
                "baseline-to-teacher gap in log perplexity." if _number(share) else
                "- share of the baseline-to-teacher gap closed: undefined (the teacher is not clearly better than "
                "the baseline on these sequences)."
            )
        if _number(student.get("ece_vs_baseline")) and _number(metrics["baseline"].get("ece")):
            out.append(f"- student ECE {student['ece']:.3f} vs the baseline's {metrics['baseline']['ece']:.3f}: "
                       f"{student['ece_vs_baseline']:+.3f}{_interval(student, 'ece_vs_baseline', lambda v: f'{v:+.3f}')} "
                       "(below 0: better calibrated).")
    params = {name: m.get("params") for name, m in metrics.items() if _number(m.get("params"))}
    if "student" in params and "teacher" in params:
        out.append(f"- student has {params['student'] / params['teacher']:.1%} of the teacher's parameters.")
    n = metrics.get("teacher", {}).get("val_sequences")
    if out and _number(n) and "val_ppl_low" in metrics.get("teacher", {}):
        out.append(f"- intervals: 95%, bootstrap over {n:,} validation sequences; comparisons are paired (every model "
                   "scored on the same resampled sequences).")
    return out


def _interval(m: dict, key: str, fmt) -> str:
    """" (95% CI a to b)" from ``m[key + "_low"]`` / ``m[key + "_high"]``, or "" without them."""
    low, high = m.get(f"{key}_low"), m.get(f"{key}_high")
    return f" (95% CI {fmt(low)} to {fmt(high)})" if _number(low) and _number(high) else ""


_WITH_CI = ("val_ppl", "ece")


def _cell(m: dict, column: str) -> str:
    """A table cell; perplexity and ECE carry their intervals when the metrics have them."""
    low, high = m.get(f"{column}_low"), m.get(f"{column}_high")
    if column in _WITH_CI and _number(low) and _number(high):
        return f"{_fmt(m.get(column))} [{_fmt(low)}, {_fmt(high)}]"
    return _fmt(m.get(column))


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    return str(v)


def png_data_uri(png: bytes) -> str:
    """A ``data:`` URI holding the PNG, which Markdown renders as an image without fetching anything."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")
