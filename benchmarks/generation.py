"""New tokens per second of the teacher sampler, ``sample()``, against ``model.generate(do_sample=True)``.

Same model, same prompts, same batches (length-bucketed, left-padded), same number of new tokens:
EOS is disabled in both, so every row generates exactly ``--new-tokens`` tokens, and
new tokens = prompts x samples x new tokens. Each loop runs once to warm up, then ``--repeats``
timed runs, alternating between the loops (best kept), in one process.

    python benchmarks/generation.py                       # small CPU sizes, < 2 min on 2 cores
    python benchmarks/generation.py --device cuda --dtype bfloat16 --batch-size 64 --prompts 256 \
        --new-tokens 128 --model gpt2-124m-random
"""

from __future__ import annotations

import argparse
import os
import random
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

from distill_core.teacher.decode import left_pad, length_buckets
from distill_core.teacher.sample import sample

MODELS = ("gpt2-124m-random", "tiny")


def build_model(name: str, device: str, dtype: str, n_layer: int | None = None, n_positions: int | None = None) -> torch.nn.Module:
    """A random-weight GPT-2, built offline: GPT2Config() defaults (124M) or the tests' tiny shape
    (``n_layer`` / ``n_positions``: override the shape's)."""
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    if name == "gpt2-124m-random":
        config = GPT2Config()
    elif name == "tiny":
        config = GPT2Config(vocab_size=384, n_positions=256, n_embd=32, n_layer=4, n_head=2)
    else:
        raise ValueError(f"--model must be one of {MODELS}, got {name!r}")
    if n_layer is not None:
        config.n_layer = n_layer
    if n_positions is not None:
        config.n_positions = n_positions
    return GPT2LMHeadModel(config).to(device=device, dtype=getattr(torch, dtype)).eval()


def make_prompts(n: int, max_len: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """Random token ids, lengths uniform in [max_len // 2, max_len], so batches need left padding."""
    rng = random.Random(seed)
    return [[rng.randrange(1, vocab) for _ in range(rng.randint(max(1, max_len // 2), max_len))] for _ in range(n)]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_loops(loops: dict, device: str, repeats: int) -> dict[str, float]:
    """Best wall time of each loop. Loops alternate within every repeat, so a busy machine slows all alike."""
    for fn in loops.values():
        fn()  # warm-up (allocator, kernels, compile)
    best = {name: float("inf") for name in loops}
    for _ in range(repeats):
        for name, fn in loops.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def generate_batches(model, prompts, *, batch_size, num_samples, new_tokens, device, **sampling):
    """model.generate over the same length buckets sample() uses."""
    with torch.inference_mode():
        for idx in length_buckets([len(p) for p in prompts], batch_size):
            padded = left_pad([prompts[i] for i in idx], 0, device)
            model.generate(
                padded.input_ids, attention_mask=padded.attention_mask, max_new_tokens=new_tokens,
                min_new_tokens=new_tokens, num_return_sequences=num_samples, pad_token_id=0, eos_token_id=None,
                **sampling,
            )


def table(rows: list[tuple], header: tuple) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--model", default="gpt2-124m-random", choices=MODELS)
    parser.add_argument("--batch-size", type=int, default=4, help="prompts per batch")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=32, help="longest prompt; lengths vary down to half")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--num-samples", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--static-cache", action="store_true", help="also time sample(static_cache=True)")
    parser.add_argument("--compile", action="store_true", help="also time sample(static_cache=True, compile=True)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = build_model(args.model, args.device, args.dtype)
    prompts = make_prompts(args.prompts, args.prompt_len, model.config.vocab_size)
    new_tokens = args.prompts * args.num_samples * args.new_tokens
    common = dict(num_samples=args.num_samples, max_new_tokens=args.new_tokens, eos_token_id=None, pad_token_id=0,
                  seed=0, batch_size=args.batch_size, temperature=1.0)

    loops = {
        "model.generate(do_sample=True)": lambda: generate_batches(
            model, prompts, batch_size=args.batch_size, num_samples=args.num_samples, new_tokens=args.new_tokens,
            device=args.device, do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
        ),
        "sample()": lambda: sample(model, prompts, **common),
    }
    if args.static_cache:
        loops["sample(static_cache=True)"] = lambda: sample(model, prompts, static_cache=True, **common)
    if args.compile:
        loops["sample(static_cache=True, compile=True)"] = lambda: sample(
            model, prompts, static_cache=True, compile=True, **common
        )

    seconds = time_loops(loops, args.device, args.repeats)
    base = seconds["model.generate(do_sample=True)"]
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"model={args.model} dtype={args.dtype} device={device_name} prompts={args.prompts} "
        f"batch_size={args.batch_size} (prompts) num_samples={args.num_samples} new_tokens={args.new_tokens} "
        f"prompt_len<={args.prompt_len} torch={torch.__version__}"
    )
    rows = [
        (name, f"{new_tokens}", f"{s:.2f}", f"{new_tokens / s:,.0f}", f"{base / s:.2f}x")
        for name, s in seconds.items()
    ]
    print(table(rows, ("loop", "new tokens", "seconds", "new tok/s", "vs generate")))


if __name__ == "__main__":
    main()
