"""The teacher-cache stages by kind: top-k soft targets, samples (SeqKD) and beam candidates."""

from __future__ import annotations

from distill_core.cache.stage import ShardJob
from distill_core.config import BeamsConfig, CacheKind, RunConfig, SamplesConfig, TopKConfig
from distill_core.data import DataRef
from distill_core.teacher.beams_cache import beams_job
from distill_core.teacher.samples_cache import samples_job
from distill_core.teacher.topk import topk_job

JOBS = {"topk": topk_job, "samples": samples_job, "beams": beams_job}


def job_for(kind: CacheKind, cfg: TopKConfig | SamplesConfig | BeamsConfig, teacher: dict, data: DataRef) -> ShardJob:
    """The ShardJob of a cache kind, from its stage config (``RunConfig.topk`` / ``.samples`` / ``.beams``)."""
    return JOBS[kind](cfg, teacher, data)


def stage_config(config: RunConfig, kind: CacheKind) -> TopKConfig | SamplesConfig | BeamsConfig:
    return getattr(config, kind)
