"""Before a long capture: how faithfully each top-k strategy keeps the teacher, and what the cache will cost.

On a sample of train positions, with the run's ``topk`` settings (k, draws, temperatures): the
teacher's mass outside its top-k at the capture temperature, the KL from what each strategy stores
(the top-k renormalised; the draws' normalised mass; the top-k plus its tail draws) to the teacher's
full distribution, and bytes per position through the real codec, projected to the whole train split.
"""

from __future__ import annotations

import numpy as np
import torch

from distill_core.cache import codec
from distill_core.cache.shards import table_to_parquet_bytes
from distill_core.config import TopKConfig
from distill_core.teacher.topk import draw_uniforms, read_targets, sparse_from_logits

STRATEGIES = ("topk", "sampled", "hybrid")


def _meta(cfg: TopKConfig, head: int) -> dict:
    return {"strategy": cfg.strategy, "k": head, "temperature": cfg.temperature, "temperatures": cfg.served_temperatures(),
            "codec": codec.CODEC, "draws": cfg.draws}


def _stored_kl(out: dict, log_p_full: torch.Tensor) -> np.ndarray:
    """KL(stored ‖ teacher) per position, the stored distribution normalised: float64 [N]."""
    if "topk_ids" in out:
        ids, weight = out["topk_ids"], np.exp(out["topk_logprobs"].astype(np.float64))
    else:
        ids, weight = out["sparse_ids"], out["sparse_mass"].astype(np.float64)
    ids, weight = ids.reshape(-1, ids.shape[-1]), weight.reshape(-1, ids.shape[-1])
    r = weight / weight.sum(-1, keepdims=True)
    log_p = log_p_full.gather(-1, torch.from_numpy(ids)).double().numpy()
    return np.where(r > 0, r * (np.log(np.where(r > 0, r, 1.0)) - log_p), 0.0).sum(-1)


def fidelity_report(model, seq_ids: np.ndarray, input_ids: np.ndarray, cfg: TopKConfig, total_positions: int) -> dict:
    """The report for the sample ``input_ids`` int64 [n, T] (their ``seq_ids`` [n] key the draws).

    Every strategy is measured with ``cfg``'s k, draws, seed and temperatures; ``configured`` marks
    the one ``cfg`` asks for. ``total_positions``: train positions of the whole split, for the
    projected size. Returns plain JSON values."""
    device = next(model.parameters()).device
    variants = {s: cfg.model_copy(update={"strategy": s}) for s in STRATEGIES}
    tails, kls = [], {s: [] for s in STRATEGIES}
    rows = {s: [] for s in STRATEGIES}
    for start in range(0, len(input_ids), cfg.batch_size):
        batch = torch.from_numpy(input_ids[start : start + cfg.batch_size]).to(device)
        ids = seq_ids[start : start + cfg.batch_size]
        with torch.inference_mode():
            logits = model(input_ids=batch).logits[:, :-1].float()
            log_p = torch.log_softmax(logits / cfg.temperature, dim=-1).reshape(-1, logits.shape[-1]).cpu()
            k = min(cfg.k, logits.shape[-1])
            tails.append((1.0 - log_p.topk(k, dim=-1).values.double().exp().sum(-1)).clamp(min=0.0).numpy())
            for name, v in variants.items():
                uniforms = draw_uniforms(v.seed, ids, logits.shape[1], v.draws) if name != "topk" else None
                sparse = sparse_from_logits(logits, v, uniforms)
                rows[name].append(sparse)
                table = codec.encode_table(ids, sparse, v.served_temperatures())
                _, out = read_targets(table, _meta(v, sparse.head), v.temperature)
                kls[name].append(_stored_kl(out, log_p))
    tail = np.concatenate(tails)
    positions = len(tail)
    strategies = {}
    for name, v in variants.items():
        sparse = codec.concat(rows[name])
        nbytes = len(table_to_parquet_bytes(codec.encode_table(seq_ids, sparse, v.served_temperatures())))
        kl = np.concatenate(kls[name])
        strategies[name] = {
            "configured": name == cfg.strategy,
            "kept_ids_per_position": float(sparse.sizes().mean()),
            "kl_stored_to_teacher": float(kl.mean()),
            "kl_stored_to_teacher_p90": float(np.quantile(kl, 0.9)),
            "bytes_per_token": nbytes / positions,
            "projected_bytes": int(round(nbytes / positions * total_positions)),
        }
    return {
        "positions": positions, "k": cfg.k, "draws": cfg.draws, "temperature": cfg.temperature,
        "temperatures": cfg.served_temperatures(), "total_positions": total_positions,
        "tail_mass": {"mean": float(tail.mean()), **{f"p{q}": float(np.quantile(tail, q / 100)) for q in (10, 50, 90, 99)}},
        "strategies": strategies,
    }


def fidelity_markdown(report: dict) -> str:
    """The report as Markdown: tail mass at k, then one row per strategy."""
    t = report["tail_mass"]
    lines = [
        f"# Top-k fidelity on {report['positions']:,} positions (k = {report['k']}, draws = {report['draws']}, "
        f"T = {report['temperature']}, serves {report['temperatures']})",
        "",
        f"Teacher mass outside its top-{report['k']}: mean {t['mean']:.3f}, median {t['p50']:.3f}, "
        f"p90 {t['p90']:.3f}, p99 {t['p99']:.3f}.",
        "",
        "| strategy | kept ids / position | KL(stored ‖ teacher) mean | p90 | bytes / token | projected size "
        f"({report['total_positions']:,} positions) |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in report["strategies"].items():
        mark = " (configured)" if s["configured"] else ""
        lines.append(f"| {name}{mark} | {s['kept_ids_per_position']:.1f} | {s['kl_stored_to_teacher']:.4f} | "
                     f"{s['kl_stored_to_teacher_p90']:.4f} | {s['bytes_per_token']:.1f} | {s['projected_bytes'] / 2**20:,.1f} MiB |")
    return "\n".join(lines) + "\n"
