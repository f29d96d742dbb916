"""Build the student: chosen teacher layers (DistilGPT2 style), a fresh smaller config, or a pretrained model.

Surgery works on any Hugging Face causal LM whose decoder blocks sit in one ``nn.ModuleList``
(GPT-2 ``transformer.h``, Llama-style ``model.layers``, ...): the student is a new model of the
teacher's class with fewer layers, and every tensor of its state dict is copied from the teacher
with a shape check (teacher block ``layers[j]`` becomes student block ``j``).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from distill_core.config import StudentConfig
from distill_core.errors import TeacherError
from distill_core.pruning.slicing import PrunePlan, prune
from distill_core.storage import Storage, loadable
from distill_core.teacher.load import check_tokenizer, pad_with_eos, tokenizer_hash, vocabulary_hash

log = logging.getLogger(__name__)

# Config entries holding one value per layer (transformers 5), subset along with the layers.
PER_LAYER_CONFIG_KEYS = (
    "layer_types",
    "mlp_layer_types",
    "layers_block_type",
    "no_rope_layers",
    "layer_rope_theta",
    "num_attention_heads_per_layer",
    "num_key_value_heads_per_layer",
)


def teacher_layer_indices(num_layers: int, every_k: int) -> list[int]:
    """Layers ``0, k, 2k, ...`` below ``num_layers``, plus the last layer when not already in.

    The first layer reads the embeddings and the last writes into the final norm and head, so both
    are kept; e.g. 30 layers, k=6 -> [0, 6, 12, 18, 24, 29]; 12 layers, k=2 -> [0, 2, 4, 6, 8, 10, 11].
    """
    if num_layers < 1 or every_k < 1:
        raise ValueError(f"need num_layers >= 1 and every_k >= 1, got {num_layers} and {every_k}")
    layers = list(range(0, num_layers, every_k))
    if layers[-1] != num_layers - 1:
        layers.append(num_layers - 1)
    return layers


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Name and module of the ``nn.ModuleList`` holding the model's decoder blocks.

    It is the outermost ModuleList with ``config.num_hidden_layers`` children of one class.
    """
    n = num_layers(model)
    found = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == n and len({type(m) for m in module}) == 1
    ]
    outermost = [(name, m) for name, m in found if not any(name.startswith(other + ".") for other, _ in found)]
    if len(outermost) != 1:
        raise TeacherError(
            f"cannot find the decoder layers of {type(model).__name__}: expected one ModuleList of {n} blocks, "
            f"found {[name for name, _ in outermost]}. Use student.init='config' or 'pretrained' for this teacher."
        )
    return outermost[0]


def num_layers(model: nn.Module) -> int:
    return int(model.config.num_hidden_layers)


def vocab_rows(model: nn.Module) -> int:
    """Width of the model's logits (rows of the output embedding)."""
    head = model.get_output_embeddings()
    return int(head.weight.shape[0]) if head is not None else int(model.config.vocab_size)


def student_from_teacher_layers(teacher: nn.Module, layers: list[int]) -> nn.Module:
    """A model of the teacher's class keeping teacher blocks ``layers`` (in that order), on CPU.

    Embeddings, final norm and LM head are copied as they are; student block ``j`` is a copy of
    teacher block ``layers[j]``. Building the student from a config with ``len(layers)`` layers
    gives every block its new index (e.g. the KV-cache ``layer_idx`` of Llama attention), and
    per-layer config lists (``layer_types``, ...) are subset to match. A GPT-2 teacher with
    ``scale_attn_by_inverse_layer_idx`` scales by the new index, so the copied block computes
    slightly differently there.
    """
    n = num_layers(teacher)
    bad = [i for i in layers if not 0 <= i < n]
    if not layers or bad:
        raise TeacherError(
            f"student layers {layers} are not all teacher layers: the teacher has {n} layers (indices 0..{n - 1}). "
            "Fix student.layers, or leave it empty to keep every student.every_k-th layer."
        )
    if len(set(layers)) != len(layers):
        raise TeacherError(f"student layers {layers} repeat a layer: list each teacher layer once.")
    if getattr(teacher.config, "is_heterogeneous", False):
        raise TeacherError(
            f"{type(teacher).__name__} has a per-layer (heterogeneous) config, which layer surgery does not "
            "handle: use student.init='config' or 'pretrained'."
        )

    config = config_with_layers(teacher.config, [*layers], n)
    student = type(teacher)(config).to(teacher.dtype)
    student.generation_config = copy.deepcopy(teacher.generation_config)

    t_prefix, _ = decoder_layers(teacher)
    s_prefix, s_blocks = decoder_layers(student)
    assert len(s_blocks) == len(layers), (len(s_blocks), layers)
    t_state, s_state = teacher.state_dict(), student.state_dict()
    used = set()
    with torch.no_grad():
        for s_key, s_tensor in s_state.items():
            t_key = _teacher_key(s_key, s_prefix, t_prefix, layers)
            assert t_key in t_state, f"student tensor {s_key} has no teacher tensor {t_key}"
            t_tensor = t_state[t_key]
            assert s_tensor.shape == t_tensor.shape, f"{s_key} {tuple(s_tensor.shape)} <- {t_key} {tuple(t_tensor.shape)}"
            s_tensor.copy_(t_tensor)
            used.add(t_key)
    kept = {f"{t_prefix}.{i}." for i in layers}
    unused = [k for k in t_state if k not in used and (not k.startswith(t_prefix + ".") or any(k.startswith(p) for p in kept))]
    assert not unused, f"teacher tensors not copied into the student: {unused}"
    return student


def student_from_config(teacher: nn.Module, num_layers: int, vocab_size: int | None = None) -> nn.Module:
    """Fresh weights in the teacher's architecture with ``num_layers`` layers (seed before calling),
    over ``vocab_size`` tokens (default: the teacher's)."""
    n = int(teacher.config.num_hidden_layers)
    if num_layers < 1:
        raise TeacherError(f"student.num_layers must be at least 1, got {num_layers}.")
    has_per_layer = any(isinstance(getattr(teacher.config, k, None), (list, tuple)) for k in PER_LAYER_CONFIG_KEYS)
    if has_per_layer and num_layers > n:
        raise TeacherError(
            f"student.num_layers={num_layers} exceeds the teacher's {n} layers, whose config lists per-layer "
            "settings: choose at most that many layers."
        )
    # The first num_layers entries of per-layer lists keep repeating patterns (e.g. 5 sliding, 1 full).
    config = config_with_layers(teacher.config, list(range(num_layers)), n)
    if vocab_size is not None:
        config.vocab_size = vocab_size
    student = type(teacher)(config).to(teacher.dtype)
    student.generation_config = copy.deepcopy(teacher.generation_config)
    return student


def student_from_pretrained(path_or_id: str, teacher_vocab_size: int, teacher_tokenizer_hash: str | None = None, *,
                            storage: Storage | None = None, own_vocabulary: bool = False) -> nn.Module:
    """A smaller pretrained causal LM from a local folder, an fsspec URL or a hub id.

    Its logits must have ``teacher_vocab_size`` columns; with ``teacher_tokenizer_hash`` its
    tokenizer (saved beside it) must also hash the same, i.e. map text to the same ids. With
    ``own_vocabulary`` (a student with its own tokenizer) neither is checked here.
    """
    from transformers import AutoModelForCausalLM

    try:
        folder = loadable(path_or_id, storage)
    except FileNotFoundError as e:
        raise TeacherError(
            f"student.pretrained {path_or_id} does not exist: point it at a folder saved with save_pretrained."
        ) from e
    try:
        model = AutoModelForCausalLM.from_pretrained(folder)
    except OSError as e:
        raise TeacherError(
            f"cannot load student.pretrained {path_or_id} ({e}): give a local folder saved with save_pretrained, "
            "or a hub id while the hub is reachable."
        ) from e
    rows = vocab_rows(model)
    if own_vocabulary:
        return model
    if rows != teacher_vocab_size:
        raise TeacherError(
            f"student {path_or_id} has a vocabulary of {rows} tokens but the teacher has {teacher_vocab_size}: "
            "choose a student that shares the teacher's tokenizer, or use student.init='teacher_layers'."
        )
    if teacher_tokenizer_hash is not None:
        check_pretrained_tokenizer(folder, path_or_id, rows, teacher_tokenizer_hash)
    return model


def check_pretrained_tokenizer(folder: str | Path, path_or_id: str, vocab_size: int, teacher_tokenizer_hash: str) -> None:
    """Raise TeacherError unless the tokenizer saved in ``folder`` (a local folder or hub id) covers
    ``vocab_size`` logits and maps text to the same ids as the teacher's (its hash is
    ``teacher_tokenizer_hash``): the registered student is saved with the teacher's tokenizer, so
    weights trained on another tokenizer would be paired with the wrong one."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError) as e:
        raise TeacherError(f"cannot check the tokenizer of student {path_or_id} ({e}): save its tokenizer beside it.") from e
    if Path(folder).is_dir():
        check_tokenizer(tokenizer, vocab_size, folder, f"student {path_or_id}")
    student_hash = tokenizer_hash(tokenizer)
    if student_hash != teacher_tokenizer_hash:
        raise TeacherError(
            f"student {path_or_id} has the teacher's vocabulary size but another tokenizer "
            f"(hash {student_hash} vs {teacher_tokenizer_hash}): choose a student that shares the teacher's tokenizer, "
            f"or set student.tokenizer: {path_or_id} to distil across tokenizers."
        )


# -- the student's own tokenizer -------------------------------------------------------------------
TokenizerCase = Literal["same", "same_size_other_tokens", "other_vocabulary"]


def tokenizer_case(teacher_tokenizer, student_tokenizer) -> TokenizerCase:
    """How the student's tokenizer relates to the teacher's.

    same: they map text to the same ids (equal ``tokenizer_hash``): distillation per token id, as
    without ``student.tokenizer``. same_size_other_tokens: as many ids, but text maps to other ids
    (another vocabulary of the same size, or the same token -> id map with another normalisation or
    pre-tokenisation): comparing logits per id would be silently wrong. other_vocabulary: vocabularies
    of different sizes."""
    if tokenizer_hash(teacher_tokenizer) == tokenizer_hash(student_tokenizer):
        return "same"
    return "same_size_other_tokens" if len(teacher_tokenizer) == len(student_tokenizer) else "other_vocabulary"


def describe_case(case: TokenizerCase, teacher_tokenizer, student_tokenizer) -> str:
    """One phrase naming ``case`` with the sizes and whether the token -> id maps agree."""
    t, s = len(teacher_tokenizer), len(student_tokenizer)
    if case == "same":
        return f"the teacher's tokenizer ({t} tokens)"
    if case == "other_vocabulary":
        return f"another vocabulary ({s} tokens; the teacher's has {t})"
    same_map = vocabulary_hash(teacher_tokenizer) == vocabulary_hash(student_tokenizer)
    what = "the same token -> id map but another normalisation or pre-tokenisation" if same_map else "other tokens behind the same ids"
    return f"the teacher's vocabulary size ({t}) with {what}"


def load_student_tokenizer(name: str, storage: Storage | None = None):
    """The tokenizer ``student.tokenizer`` names (a local folder, an fsspec URL or a hub id), with a
    pad token (its EOS token when it has none; padded positions are masked out of every loss)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(loadable(name, storage, weights=False))
    except (OSError, ValueError, TypeError, FileNotFoundError) as e:
        raise TeacherError(
            f"cannot load student.tokenizer {name!r} ({e}): give a folder saved with tokenizer.save_pretrained, "
            "or a hub id while the hub is reachable."
        ) from None
    if not tokenizer.is_fast:
        raise TeacherError(
            f"student.tokenizer {name!r} is a slow (Python) tokenizer, which gives no offsets to align by: "
            "save its fast version (tokenizer.json) and point student.tokenizer at that."
        )
    pad_with_eos(tokenizer, f"student.tokenizer {name!r} has neither a pad nor an EOS token: save it with an EOS token "
                            "(tokenizer.add_special_tokens({'eos_token': ...})), which also separates documents.")
    return tokenizer


def embedding_rows(teacher_table: list[bytes], student_table: list[bytes], teacher_rows: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Embedding rows [Vs, D] for the student's vocabulary from the teacher's ``teacher_rows`` [Vt, D].

    The rule, per student token (by the bytes it spells, :func:`distill_core.tokens.token_bytes`):
    a teacher token spelling the same bytes gives its row as it is ("copied"); otherwise the mean of
    the rows of the teacher tokens that spell its bytes, longest match first ("spelled"); a token
    no teacher tokens spell (or that spells nothing) gets the mean of all teacher rows ("mean").
    Returns (rows in ``teacher_rows``' dtype, counts of each case)."""
    from distill_core.tokens import spell

    index: dict[bytes, int] = {}
    for i, b in enumerate(teacher_table[: teacher_rows.shape[0]]):
        if b:
            index.setdefault(b, i)
    longest = max(map(len, index), default=1)
    rows, cols, weights, counts = [], [], [], {"copied": 0, "spelled": 0, "mean": 0}
    mean_rows = []
    for s, b in enumerate(student_table):
        ids = spell(b, index, longest) if b else None
        if not ids:
            mean_rows.append(s)
            counts["mean"] += 1
            continue
        counts["copied" if len(ids) == 1 and teacher_table[ids[0]] == b else "spelled"] += 1
        rows += [s] * len(ids)
        cols += ids
        weights += [1.0 / len(ids)] * len(ids)
    source = teacher_rows.detach().float()
    out = torch.zeros(len(student_table), source.shape[1])
    out.index_add_(0, torch.tensor(rows, dtype=torch.long), source[torch.tensor(cols, dtype=torch.long)] * torch.tensor(weights)[:, None])
    out[mean_rows] = source.mean(0)
    return out.to(teacher_rows.dtype), counts


def with_vocabulary(student: nn.Module, teacher_tokenizer, student_tokenizer) -> dict:
    """Give ``student`` (built from the teacher's weights) the vocabulary of ``student_tokenizer``, in place:
    the input embedding and an untied LM head are rebuilt by :func:`embedding_rows` from the teacher's
    rows; the config's vocabulary size and special token ids become the student tokenizer's. Returns
    how many rows were copied, spelled and set to the mean (for each rebuilt matrix)."""
    from distill_core.tokens import token_bytes

    t_table, s_table = token_bytes(teacher_tokenizer), token_bytes(student_tokenizer)
    old_in = student.get_input_embeddings().weight.detach().clone()
    head = student.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == student.get_input_embeddings().weight.data_ptr()
    old_out = head.weight.detach().clone() if head is not None and not tied else None
    new_in, counts = embedding_rows(t_table, s_table, old_in)
    student.resize_token_embeddings(len(s_table), mean_resizing=False)
    with torch.no_grad():
        student.get_input_embeddings().weight.copy_(new_in)
        if old_out is not None:
            new_out, _ = embedding_rows(t_table, s_table, old_out)
            student.get_output_embeddings().weight.copy_(new_out)
            head_bias = getattr(student.get_output_embeddings(), "bias", None)
            if head_bias is not None:
                head_bias.zero_()
    set_special_tokens(student, student_tokenizer)
    return {"vocabulary": len(s_table), **counts, "tied_head": tied}


def set_special_tokens(model: nn.Module, tokenizer) -> None:
    """The model's config and generation config take ``tokenizer``'s BOS, EOS and pad ids."""
    for config in (model.config, model.generation_config):
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            setattr(config, name, getattr(tokenizer, name))


def build_student(
    teacher: nn.Module, cfg: StudentConfig, seed: int, *, teacher_tokenizer_hash: str | None = None,
    storage: Storage | None = None, plan: PrunePlan | None = None, tokenizers: tuple | None = None,
) -> nn.Module:
    """The student ``cfg.init`` asks for, checked to share the teacher's vocabulary.

    ``seed`` fixes any fresh initialisation; the global RNG state is left as it was. A pruned
    student needs its ``plan`` (see :func:`distill_core.pruning.plan.plan_student`). With
    ``tokenizers`` = (teacher's, student's), the student gets the student tokenizer's vocabulary
    instead (``student.tokenizer``): a config student is built with it, a teacher_layers or pruned
    student has its embedding and head rebuilt by :func:`with_vocabulary`, a pretrained one keeps its own.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if cfg.init == "teacher_layers":
            layers = cfg.layers if cfg.layers is not None else teacher_layer_indices(num_layers(teacher), cfg.every_k)
            student = student_from_teacher_layers(teacher, layers)
        elif cfg.init == "pruned":
            if plan is None:
                raise ValueError("student.init 'pruned' needs its plan: compute it with distill_core.pruning.plan.plan_student")
            student = prune(teacher, plan)
        elif cfg.init == "config":
            student = student_from_config(teacher, cfg.num_layers, vocab_size=len(tokenizers[1]) if tokenizers else None)
        else:
            student = student_from_pretrained(cfg.pretrained, vocab_rows(teacher), None if tokenizers else teacher_tokenizer_hash,
                                              storage=storage, own_vocabulary=tokenizers is not None)
    if tokenizers is None:
        check_vocab(student, teacher)
    else:
        if cfg.init in ("teacher_layers", "pruned"):
            log.info("student vocabulary rebuilt from the teacher's rows: %s", with_vocabulary(student, *tokenizers))
        elif cfg.init == "config":
            set_special_tokens(student, tokenizers[1])
        if vocab_rows(student) < len(tokenizers[1]):
            raise TeacherError(
                f"student has {vocab_rows(student)} logits but student.tokenizer {cfg.tokenizer} has {len(tokenizers[1])} "
                "tokens: name the tokenizer saved with the pretrained student."
            )
    log.info("student (%s): %d layers, %d parameters", cfg.init, num_layers(student), count_parameters(student))
    return student


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Parameters, each shared (tied) tensor counted once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def check_vocab(student: nn.Module, teacher: nn.Module) -> None:
    """Raise TeacherError unless student and teacher logits index the same vocabulary size."""
    s, t = vocab_rows(student), vocab_rows(teacher)
    if s != t:
        raise TeacherError(
            f"student vocabulary ({s} tokens) differs from the teacher's ({t}): distillation compares logits per "
            "token id, so choose a student that shares the teacher's tokenizer."
        )


# -- helpers ---------------------------------------------------------------------------------------
def config_with_layers(config, layers: list[int], teacher_layers: int):
    """Copy of ``config`` with ``len(layers)`` layers and per-layer lists subset to ``layers``."""
    config = copy.deepcopy(config)
    for key in PER_LAYER_CONFIG_KEYS:
        values = getattr(config, key, None)
        if isinstance(values, (list, tuple)) and len(values) == teacher_layers:
            setattr(config, key, [values[i] for i in layers])
    config.num_hidden_layers = len(layers)
    return config


def _teacher_key(student_key: str, s_prefix: str, t_prefix: str, layers: list[int]) -> str:
    """Teacher state-dict key for ``student_key``: block ``j`` maps to block ``layers[j]``."""
    head = s_prefix + "."
    if not student_key.startswith(head):
        return student_key
    index, rest = student_key[len(head) :].split(".", 1)
    return f"{t_prefix}.{layers[int(index)]}.{rest}"
