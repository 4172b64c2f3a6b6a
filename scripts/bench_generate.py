"""Greedy decoding speed: streamline_jax.generate against transformers' generate on SmolLM2-135M (float32, CPU).

Each side makes `--new-tokens` tokens (EOS ignored) for a batch of copies of one prompt, at batch 1 and batch 8;
greedily, or with `--sample` at the self-data settings (temperature 0.7, top-p 0.9: each step filters the
vocabulary's logits, so the tokens differ between the two sides).
Ours is timed on its second call (the first compiles); transformers after a short warm-up. Tokens per second =
batch * new tokens / wall time, prompt processing included (the prompt is short). Prints the compiles a run needs.

    python scripts/bench_generate.py [--new-tokens 128] [--batches 1 8] [--torch-threads N] [--sample] [--ours-only]

--ours-only skips transformers (e.g. to set two versions of the package side by side: PYTHONPATH=<other checkout>).
"""

from __future__ import annotations

import argparse
import time

import torch

import streamline_jax as sj
from streamline_jax.generation import compile_count, generate

PROMPT = "The history of the printing press begins in the fifteenth century, when"


SAMPLING = dict(temperature=0.7, top_p=0.9)  # data.self_temperature, data.self_top_p


def bench_ours(model, batch, new_tokens, sampling):
    prompts = [PROMPT] * batch
    start = time.perf_counter()
    generate(model, prompts, new_tokens, eos_token_id=(), **sampling)
    first = time.perf_counter() - start
    compiles = compile_count()
    start = time.perf_counter()
    out = generate(model, prompts, new_tokens, eos_token_id=(), **sampling)
    seconds = time.perf_counter() - start
    assert all(len(t) == new_tokens for t in out.tokens)
    return batch * new_tokens / seconds, first, compiles, out.tokens[0]


def bench_torch(model, ids, batch, new_tokens, sampling):
    ids = ids.repeat(batch, 1)
    kwargs = dict(attention_mask=torch.ones_like(ids), pad_token_id=0, do_sample=bool(sampling), **sampling)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kwargs)  # warm-up
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
        seconds = time.perf_counter() - start
    return batch * new_tokens / seconds, out[0, ids.shape[1]:].tolist()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--torch-threads", type=int, default=None, help="default: torch's own choice")
    parser.add_argument("--sample", action="store_true", help="temperature 0.7, top-p 0.9 instead of greedy")
    parser.add_argument("--ours-only", action="store_true", help="skip transformers' side")
    args = parser.parse_args()
    sampling = SAMPLING if args.sample else {}
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    from transformers import AutoModelForCausalLM

    from streamline_jax.loading import embedded_gguf

    ours = sj.load("smollm2-135m")
    path = embedded_gguf("smollm2-135m")
    ref = None if args.ours_only else AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                                            dtype=torch.float32).eval()
    ids = torch.tensor([ours.tokenizer(PROMPT)["input_ids"]])
    print(f"SmolLM2-135M float32, prompt {ids.shape[1]} tokens, {args.new_tokens} new tokens, "
          f"{'sampled at ' + str(sampling) if sampling else 'greedy'}; "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'batch':>5} {'ours tok/s':>11} {'torch tok/s':>12} {'ratio':>6} {'first call s':>13} "
          f"{'compiles':>8} {'same tokens':>11}")
    for batch in args.batches:
        ours_tps, first, compiles, ours_tokens = bench_ours(ours, batch, args.new_tokens, sampling)
        if args.ours_only:
            print(f"{batch:>5} {ours_tps:>11.1f} {'-':>12} {'-':>6} {first:>13.1f} {compiles:>8} {'-':>11}")
            continue
        torch_tps, torch_tokens = bench_torch(ref, ids, batch, args.new_tokens, sampling)
        print(f"{batch:>5} {ours_tps:>11.1f} {torch_tps:>12.1f} {ours_tps / torch_tps:>6.2f} {first:>13.1f} "
              f"{compiles:>8} {str(ours_tokens == torch_tokens):>11}")
    print(f"compiles in this run: {compile_count()} (a prefill and a decode function per batch size; "
          f"a second call with the same shapes compiles nothing)")


if __name__ == "__main__":
    main()
