"""Resolve ``student.init: pruned`` into a plan: checks first, then calibration, then (with
``target_params``) the shape search; the result is stored under ``pruning/<fingerprint>/plan.json``
so every student of a run (the KD student and its CE-only baseline) shares one init and a rerun
recomputes nothing."""

from __future__ import annotations

import io
import logging
from dataclasses import asdict
from typing import Callable

import torch
from torch import nn

from distill_core.config import StudentConfig, TrainConfig
from distill_core.errors import ConfigError
from distill_core.pruning.arch import Geometry, geometry
from distill_core.pruning.importance import Importance, calibrate
from distill_core.pruning.search import candidates, count_params, search, shape_params, spread, width_step
from distill_core.pruning.slicing import PrunePlan, Shape, choose_layers, plan_for
from distill_core.storage import Storage, fingerprint

log = logging.getLogger(__name__)
PLAN = "plan.json"
PLAN_VERSION = 1


def check_request(teacher_config, cfg: StudentConfig) -> None:
    """Refuse a pruned shape the teacher cannot give, naming the field and the fix (before any teacher work)."""
    geo = geometry(teacher_config)  # refuses unknown architectures
    if cfg.layers is not None and max(cfg.layers) >= geo.num_layers:
        raise ConfigError(f"student.layers {cfg.layers} name layers the teacher lacks: it has {geo.num_layers} "
                          f"(indices 0..{geo.num_layers - 1}).")
    limits = {"num_layers": (cfg.num_layers if cfg.layers is None and cfg.target_params is None else None, geo.num_layers),
              "intermediate_size": (cfg.intermediate_size, geo.intermediate_size),
              "num_attention_heads": (cfg.num_attention_heads, geo.num_heads),
              "num_key_value_heads": (cfg.num_key_value_heads, geo.num_kv_heads),
              "hidden_size": (cfg.hidden_size, geo.hidden_size)}
    for name, (value, most) in limits.items():
        if value is not None and value > most:
            raise ConfigError(f"student.{name}={value} is larger than the teacher's {most}: a pruned student keeps at "
                              f"most what the teacher has; choose {most} or fewer.")
    if geo.family == "gpt2":
        cut = [n for n in ("num_attention_heads", "num_key_value_heads", "hidden_size")
               if limits[n][0] is not None and limits[n][0] < limits[n][1]]
        if cut:
            raise ConfigError(f"student {cut} cannot be pruned in GPT-2, whose attention width is tied to its hidden size "
                              "(head_dim = n_embd / n_head): prune GPT-2 students by depth and intermediate_size only.")
    if cfg.num_attention_heads is not None and cfg.num_attention_heads % geo.group_size:
        raise ConfigError(f"student.num_attention_heads={cfg.num_attention_heads} splits a KV group: the teacher shares each "
                          f"KV group among {geo.group_size} query heads and whole groups are pruned, so choose a multiple "
                          f"of {geo.group_size}.")
    if (cfg.num_attention_heads is not None and cfg.num_key_value_heads is not None
            and cfg.num_attention_heads != cfg.num_key_value_heads * geo.group_size):
        raise ConfigError(f"student.num_attention_heads={cfg.num_attention_heads} and num_key_value_heads="
                          f"{cfg.num_key_value_heads} do not keep whole KV groups of {geo.group_size} heads: give "
                          f"num_attention_heads = {geo.group_size} × num_key_value_heads, or only one of them.")
    if cfg.target_params is not None:
        kv, hidden = _kv_groups(geo, cfg), cfg.hidden_size or geo.hidden_size
        full = count_params(teacher_config)
        if cfg.target_params >= full:
            raise ConfigError(f"student.target_params={cfg.target_params:,} is not below the teacher's {full:,} parameters: "
                              "choose a smaller budget.")
        step = width_step(geo.intermediate_size)
        smallest = shape_params(teacher_config, 1, step, kv, hidden)
        if cfg.target_params < smallest:
            raise ConfigError(f"student.target_params={cfg.target_params:,} is below the smallest pruned student "
                              f"({smallest:,}: one layer, {step} MLP neurons, at this hidden size): choose a larger budget "
                              "or a smaller hidden_size.")
        if not candidates(teacher_config, cfg.target_params, kv, hidden):
            raise ConfigError(f"no student shape lies within 3% of student.target_params={cfg.target_params:,}: choose "
                              "another budget or give an explicit shape (num_layers, intermediate_size).")


def importance_for(teacher: nn.Module, ids: torch.Tensor, storage: Storage, teacher_fp: str, data_fp: str) -> Importance:
    """The calibration scores of ``teacher`` on ``ids`` ``[N, T]``, stored under ``pruning/importance/<fp>.pt``
    so that plans of other shapes on the same teacher, data and calibration size reuse them."""
    rel = "pruning/importance/" + fingerprint({"version": PLAN_VERSION, "teacher": teacher_fp, "data": data_fp,
                                               "sequences": list(ids.shape)}) + ".pt"
    if storage.exists(rel):
        return Importance(**torch.load(storage.bytes_io(rel), weights_only=True))
    importance = calibrate(teacher, ids)
    buf = io.BytesIO()
    torch.save(asdict(importance), buf)
    storage.write_bytes(rel, buf.getvalue())
    return importance


def plan_folder(cfg: StudentConfig, train_cfg: TrainConfig, teacher_fp: str, data_fp: str) -> str:
    """Content address of a plan: the pruning settings, the teacher and the data (and, for a search,
    the settings its healing uses)."""
    search = {"lr": train_cfg.lr, "batch_size": train_cfg.batch_size, "seed": train_cfg.seed} if cfg.target_params else None
    return "pruning/" + fingerprint({"version": PLAN_VERSION, "student": cfg.model_dump(), "teacher": teacher_fp,
                                     "data": data_fp, "search": search})


def plan_student(
    teacher: nn.Module, cfg: StudentConfig, train_cfg: TrainConfig, storage: Storage, teacher_fp: str, data_fp: str,
    sequences: Callable[[int], torch.Tensor],
) -> dict:
    """The stored plan of these settings, or a new one: calibration on the first ``calibration_sequences``
    train sequences (``sequences(n)`` gives ``[n, T]`` int64), then the explicit shape or the search.

    Returns ``{"folder", "plan", "shape", "params", "importance", "search"}`` (JSON-ready)."""
    folder = plan_folder(cfg, train_cfg, teacher_fp, data_fp)
    if storage.exists(f"{folder}/{PLAN}"):
        return storage.read_json(f"{folder}/{PLAN}")
    check_request(teacher.config, cfg)
    geo = geometry(teacher.config)
    n = cfg.calibration_sequences
    held = max(2, n // 4) if cfg.target_params else 0
    ids = sequences(n + held)
    if ids.shape[0] < n + held:
        raise ConfigError(f"student.calibration_sequences={n} (+{held} held out for the search) exceeds the "
                          f"{ids.shape[0]} train sequences: lower it or prepare more data.")
    importance = importance_for(teacher, ids[:n], storage, teacher_fp, data_fp)
    kv, hidden = _kv_groups(geo, cfg), cfg.hidden_size or geo.hidden_size
    records = None
    if cfg.target_params:
        found = spread(candidates(teacher.config, cfg.target_params, kv, hidden), cfg.search_candidates)
        log.info("pruning search: healing %d candidate shapes for %d steps each", len(found), cfg.search_steps)
        shape, records = search(teacher, importance, found, kv, hidden, ids[:n], ids[n:], steps=cfg.search_steps,
                                lr=train_cfg.lr, batch_size=train_cfg.batch_size, seed=train_cfg.seed)
    else:
        layers = tuple(cfg.layers) if cfg.layers is not None else choose_layers(importance.block_influence, cfg.num_layers)
        shape = Shape(layers, cfg.intermediate_size or geo.intermediate_size, kv, hidden)
    plan = plan_for(importance, shape)
    record = {
        "folder": folder,
        "plan": plan.to_dict(),
        "shape": {"layers": list(shape.layers), "intermediate_size": shape.intermediate_size,
                  "num_key_value_heads": shape.num_kv_heads, "num_attention_heads": shape.num_kv_heads * geo.group_size,
                  "hidden_size": shape.hidden_size},
        "params": shape_params(teacher.config, len(shape.layers), shape.intermediate_size, kv, hidden),
        "importance": importance.summary(),
        "search": records,
    }
    storage.write_json(f"{folder}/{PLAN}", record)
    return record


def plan_of(record: dict) -> PrunePlan:
    return PrunePlan.from_dict(record["plan"])


def _kv_groups(geo: Geometry, cfg: StudentConfig) -> int:
    if cfg.num_key_value_heads is not None:
        return cfg.num_key_value_heads
    if cfg.num_attention_heads is not None:
        return cfg.num_attention_heads // geo.group_size
    return geo.num_kv_heads
