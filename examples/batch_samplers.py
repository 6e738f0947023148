"""Several prompts in one batch, decoded with different samplers.

    python examples/batch_samplers.py
    python examples/batch_samplers.py --model google/gemma-2-2b --max-tokens 40

Prompts of different lengths are left-padded into one batch; under greedy
decoding every row gets exactly what its prompt gives alone.  Sampling is seeded,
so every run prints the same text.  Beam and contrastive search (mlx_gemma.search)
take one prompt at a time.
"""

import argparse

import mlx_gemma
from mlx_gemma.generate import batch_generate
from mlx_gemma.samplers import make_logits_processors, make_sampler
from mlx_gemma.search import beam_search, contrastive_search

PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model folder or hub repo id (default: the packaged model)")
    p.add_argument("--max-tokens", type=int, default=24)
    args = p.parse_args()

    model, tokenizer = mlx_gemma.load(args.model)
    samplers = {
        "greedy": dict(sampler=make_sampler(0.0)),
        "temperature 0.8, top-k 40": dict(sampler=make_sampler(0.8, top_k=40, seed=0)),
        "top-p 0.9": dict(sampler=make_sampler(1.0, top_p=0.9, seed=0)),
        "min-p 0.1, repetition penalty 1.3": dict(sampler=make_sampler(1.0, min_p=0.1, seed=0),
                                                  logits_processors=make_logits_processors(repetition_penalty=1.3)),
    }
    for name, settings in samplers.items():
        print(f"== {name}")
        for prompt, text in zip(PROMPTS, batch_generate(model, tokenizer, PROMPTS, args.max_tokens, **settings)):
            print(f"{prompt!r} -> {text!r}")

    ids = tokenizer.encode(PROMPTS[0])
    stops = sorted(tokenizer.eos_token_ids)
    (best,) = beam_search(model, ids, args.max_tokens, num_beams=4, stop_token_ids=stops)
    print(f"== beam search (4 beams)\n{PROMPTS[0]!r} -> {tokenizer.decode(best.tokens, skip_special_tokens=True)!r}"
          f" (log-probability {best.logprob:.2f})")
    picked = list(contrastive_search(model, ids, args.max_tokens, top_k=4, alpha=0.6, stop_token_ids=stops))
    print(f"== contrastive search (k=4, alpha=0.6)\n{PROMPTS[0]!r} -> "
          f"{tokenizer.decode(picked, skip_special_tokens=True)!r}")


if __name__ == "__main__":
    main()
