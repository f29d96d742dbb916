"""Shared fixtures: a tiny real tokenizer and tiny random GPT-2 teachers, built offline."""

from __future__ import annotations

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch


def build_tiny_tokenizer(vocab_size: int = 384, first_topic: int = 0):
    """A byte-level BPE trained on 20 of Python's pydoc topics from ``first_topic`` on: real merges, tiny vocabulary."""
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(topics.values())[first_topic : first_topic + 20], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def build_tiny_gpt2(vocab_size: int, n_layer: int = 4, n_embd: int = 32, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab_size, n_positions=256, n_embd=n_embd, n_layer=n_layer, n_head=2,
        bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="session", autouse=True)
def _local_cache(tmp_path_factory):
    """Local copies of remote folders (``$DISTILLERY_CACHE``) go to a temporary folder, not ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DISTILLERY_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def other_tokenizer():
    """A tokenizer of the tiny tokenizer's size (384) trained on other text: the same ids mean other tokens."""
    return build_tiny_tokenizer(first_topic=20)


@pytest.fixture(scope="session")
def small_tokenizer():
    """Another vocabulary (300 tokens, trained on other text): a student tokenizer for distilling across tokenizers."""
    return build_tiny_tokenizer(vocab_size=300, first_topic=10)


@pytest.fixture(scope="session")
def tiny_teacher(tiny_tokenizer):
    """A 4-layer, 32-wide random GPT-2 over the tiny tokenizer's vocabulary."""
    return build_tiny_gpt2(len(tiny_tokenizer))


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory, tiny_teacher, tiny_tokenizer):
    """The tiny teacher saved in Hugging Face format (safetensors + tokenizer), usable as a PathTeacher."""
    path = tmp_path_factory.mktemp("tiny_teacher")
    tiny_teacher.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


# -- S3 (moto server) ------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1 (free port) for the session; returns its endpoint URL."""
    import socket

    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.MonkeyPatch.context() as mp:
        # Fake credentials so neither boto nor s3fs looks for real ones.
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.stop()


@pytest.fixture
def s3_storage(s3_server):
    """A Storage rooted at ``s3://<fresh bucket>/root`` on the moto server."""
    import uuid

    import s3fs

    from distill_core.storage import Storage

    options = {"endpoint_url": s3_server, "key": "testing", "secret": "testing"}
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(**options).mkdir(bucket)
    return Storage(f"s3://{bucket}/root", options)


# -- MLflow tracking server ------------------------------------------------------------------------
@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real ``mlflow server`` on 127.0.0.1 (free port, SQLite backend, local artifact root); its URL."""
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    root = tmp_path_factory.mktemp("mlflow")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # No job runner (it starts a pool of worker processes the registry never uses), no telemetry.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    cmd = [
        sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts"),
    ]
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180  # the first start migrates the SQLite schema: ~20 s on 2 cores
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {proc.returncode}: {(root / 'server.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server not ready after 180 s: {(root / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        # The server runs uvicorn in a child process: end the process group it leads, stragglers too.
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                pass
        log.close()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads; on a busy 2-core box OpenMP spinning made decode-loop
    tests ~5x slower with 2 threads. Opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_llama(tiny_tokenizer):
    """A 2-layer, 32-wide random Llama (grouped-query attention) over the tiny vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def make_prompts(tiny_tokenizer):
    """``make_prompts(n, seed=0, max_len=11)``: n prompts of mixed lengths (1..max_len) over the tiny
    vocabulary (never id 0, the EOS), so every batch is left-padded."""
    import random

    def make(n: int, seed: int = 0, max_len: int = 11) -> list[list[int]]:
        rng = random.Random(seed)
        return [[rng.randrange(1, len(tiny_tokenizer)) for _ in range(rng.randrange(1, max_len + 1))] for _ in range(n)]

    return make
