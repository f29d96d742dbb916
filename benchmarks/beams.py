"""Throughput of the teacher beam search, ``beam_search()``, against ``model.generate(num_beams=4, num_return_sequences=4)``.

Figure: prompt-tokens/s = prompts x new tokens / seconds, i.e. how many (prompt, decode step) pairs
a second, whatever the beam count (each step of one prompt advances all of its beams). EOS is
disabled in both loops, so every beam runs exactly ``--new-tokens`` steps and the work is equal.
Same model, same prompts, same batches (length-bucketed, left-padded); one warm-up run each, then
``--repeats`` timed runs, alternating between the loops (best kept), in one process. The header
also reports how often each loop's best candidate (ids) equals generate's, as a check that all did
the same search. ``--static-cache`` and ``--compile`` add the fixed-shape and compiled paths.

    python benchmarks/beams.py                            # small CPU sizes, < 2 min on 2 cores
    python benchmarks/beams.py --device cuda --dtype bfloat16 --batch-size 128 --prompts 128 \
        --new-tokens 128 --model gpt2-124m-random --static-cache --compile
"""

from __future__ import annotations

import argparse

import torch
from generation import MODELS, build_model, make_prompts, table, time_loops  # same folder

from distill_core.teacher.beam import beam_search
from distill_core.teacher.decode import left_pad, length_buckets


def generate_beams(model, prompts, *, batch_size, num_beams, new_tokens, device) -> list[list[int]]:
    """model.generate beam search over the same length buckets beam_search() uses; best ids per prompt."""
    best: list[list[int]] = [[] for _ in prompts]
    with torch.inference_mode():
        for idx in length_buckets([len(p) for p in prompts], batch_size):
            padded = left_pad([prompts[i] for i in idx], 0, device)
            out = model.generate(
                padded.input_ids, attention_mask=padded.attention_mask, num_beams=num_beams,
                num_return_sequences=num_beams, do_sample=False, max_new_tokens=new_tokens,
                min_new_tokens=new_tokens, early_stopping=True, pad_token_id=0, eos_token_id=None,
            )
            width = padded.input_ids.shape[1]
            for j, i in enumerate(idx):
                best[i] = out[j * num_beams, width:].tolist()
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--model", default="gpt2-124m-random", choices=MODELS)
    parser.add_argument("--batch-size", type=int, default=4, help="prompts per batch (x num_beams rows)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=32, help="longest prompt; lengths vary down to half")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--num-beams", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--static-cache", action="store_true", help="also time beam_search(static_cache=True)")
    parser.add_argument("--compile", action="store_true", help="also time beam_search(static_cache=True, compile=True)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = build_model(args.model, args.device, args.dtype)
    prompts = make_prompts(args.prompts, args.prompt_len, model.config.vocab_size)
    kw = dict(batch_size=args.batch_size, num_beams=args.num_beams)
    found: dict[str, list[list[int]]] = {}

    def run_generate():
        found["generate"] = generate_beams(model, prompts, new_tokens=args.new_tokens, device=args.device, **kw)

    def ours(name: str, **options):
        def run():
            out = beam_search(model, prompts, max_new_tokens=args.new_tokens, eos_token_id=None, pad_token_id=0, **kw, **options)
            found[name] = [candidates[0].completion_ids for candidates in out]

        return run

    name_generate = f"model.generate(num_beams={args.num_beams}, num_return_sequences={args.num_beams})"
    loops = {name_generate: run_generate, "beam_search()": ours("beam_search()")}
    if args.static_cache:
        loops["beam_search(static_cache=True)"] = ours("beam_search(static_cache=True)", static_cache=True)
    if args.compile:
        name = "beam_search(static_cache=True, compile=True)"
        loops[name] = ours(name, static_cache=True, compile=True)
    seconds = time_loops(loops, args.device, args.repeats)
    agree = ", ".join(
        f"{name} {sum(a == b for a, b in zip(found['generate'], best)) / len(prompts):.0%}"
        for name, best in found.items() if name != "generate"
    )
    work = args.prompts * args.new_tokens
    base = seconds[name_generate]
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"model={args.model} dtype={args.dtype} device={device_name} prompts={args.prompts} "
        f"batch_size={args.batch_size} (prompts) num_beams={args.num_beams} new_tokens={args.new_tokens} "
        f"prompt_len<={args.prompt_len} torch={torch.__version__}; best candidate identical to generate's for: {agree}"
    )
    rows = [(name, f"{work}", f"{s:.2f}", f"{work / s:,.0f}", f"{base / s:.2f}x") for name, s in seconds.items()]
    print(table(rows, ("loop", "prompts x new tokens", "seconds", "prompt-tok/s", "vs generate")))


if __name__ == "__main__":
    main()
