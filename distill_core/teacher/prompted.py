"""What the samples and beams caches share: prompts cut from train sequences, the cache's content
address, and the ids generation needs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from distill_core.cache.ref import CacheRef, teacher_cache_ref
from distill_core.config import BeamsConfig, SamplesConfig
from distill_core.data import DataRef, id_type
from distill_core.errors import ConfigError


@dataclass(frozen=True)
class Prompted:
    ref: CacheRef
    ids_type: pa.DataType  # token ids as stored (uint16 when the vocabulary fits)
    eos: int | None
    pad: int

    @property
    def ids_np(self):
        return self.ids_type.to_pandas_dtype()


def prompted_cache(kind: str, cfg: SamplesConfig | BeamsConfig, teacher: dict, data: DataRef) -> Prompted:
    """Check the prompt length against the data and address the cache by every setting that can change
    its rows: not the batch size or the decode kind, which change only how the teacher gets there."""
    if cfg.prompt_len >= data.seq_len:
        raise ConfigError(
            f"{kind}.prompt_len {cfg.prompt_len} must be below data.seq_len {data.seq_len}: prompts are cut from train sequences."
        )
    eos = teacher.get("eos_token_id")
    ref = teacher_cache_ref(kind, cfg.model_dump(exclude={"batch_size", "decode"}), teacher, data)
    return Prompted(ref, id_type(data.vocab_size), eos, eos if eos is not None else 0)


def prompts_of(input_ids: np.ndarray, prompt_len: int) -> list[list[int]]:
    """The first ``prompt_len`` tokens of each train sequence (int64 [n, T])."""
    return [row[:prompt_len].tolist() for row in input_ids]
