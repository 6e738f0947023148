"""Speculative decoding speed: mlx_gemma's (prompt lookup, a draft model) against plain decoding and mlx-lm's.

The target is the packaged Gemma 3 270M in bf16; the draft is its own 4-bit conversion (our
converter, group 64; the folder loads in mlx-lm unchanged).  Two prompts, both in the chat
template: a summary that should quote its source (where speculation can pay) and free creative
text (where it cannot: little to look up, and a draft nearly as costly as the target).  One
alternating run: every variant once per repetition, in the same order, after a short warm-up.

Variants: ours plain; ours with `prompt_lookup`; ours with `draft_model`; mlx-lm plain; mlx-lm's
`stream_generate(draft_model=..., num_draft_tokens=...)`.  All greedy, ending at eos or
`--max-tokens`.  mlx-lm's draft mode runs the 4-bit draft through MLX's x86 quantized kernel,
which is very slow on this CPU (see bench_generate's 270m-4bit section), so it runs
`--mlx-lm-draft-reps` times on `--mlx-lm-draft-tokens` tokens (its figures are tokens/s all the same).

Figures: decode tokens/s (tokens after the first / time after the first), end-to-end tokens/s
(tokens / time from the call, prefill included: a draft's own prefill of the prompt happens there
for mlx-lm, during decoding for ours), accepted / proposed, and per repetition the ratio of each
variant to plain decoding of its library on the same prompt (medians reported).  Greedy outputs of
ours with speculation are checked against ours plain, token for token, and printed.

    python benchmarks/bench_speculative.py                 # records in RESULTS.md
    python benchmarks/bench_speculative.py --reps 1 --max-tokens 32 --no-record
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import common  # noqa: E402
import models  # noqa: E402

SOURCE = (
    "The lighthouse at Hollow Point was built in 1871 from granite quarried on the island itself. "
    "For ninety years a keeper lived in the cottage at its foot, trimming the wick every four hours "
    "and winding the clockwork that turned the lens. In 1962 the light was electrified, and the last "
    "keeper, Margaret Evans, left the island after thirty-one years of service. The tower was "
    "restored in 2004 by volunteers, who replaced the rusted lantern room and repainted the red "
    "band that sailors use to tell it apart from the light at Grey Rocks. Today the lighthouse is "
    "a museum, open from May to September, and its light still flashes white every ten seconds."
)
PROMPTS = {
    "quote": ("Summarise the following passage in a few sentences. Quote its key sentences word for "
              f"word.\n\n{SOURCE}"),
    "free": "Write a short, original poem about a fox who collects old clocks.",
}


def timed(stream, proposed_of=None) -> dict:
    """Time a stream of responses: decode and end-to-end tokens/s, tokens, accepted / proposed."""
    tic, first, tokens, last = time.perf_counter(), None, [], None
    for r in stream:
        first = first or time.perf_counter()
        tokens.append(int(r.token))
        last = r
    end = time.perf_counter()
    out = {"tokens": tokens, "decode_tps": (len(tokens) - 1) / max(end - first, 1e-9),
           "e2e_tps": len(tokens) / (end - tic)}
    if proposed_of is not None:
        out["accepted"], out["proposed"] = proposed_of(last)
    return out


def ours(model, tokenizer, ids, max_tokens, **speculation):
    from mlx_gemma.generate import stream_generate

    counts = (lambda r: (r.draft_accepted or 0, r.draft_proposed or 0)) if speculation else None
    return lambda: timed(stream_generate(model, tokenizer, ids, max_tokens=max_tokens, **speculation), counts)


def mlx_lm(model, tokenizer, ids, max_tokens, draft=None, k=None):
    import mlx_lm

    extra = {} if draft is None else {"draft_model": draft, "num_draft_tokens": k}
    drafted = []

    def counts(_):  # mlx-lm flags each drafted token it kept; proposals are not reported
        return sum(drafted), None

    def run():
        drafted.clear()
        stream = mlx_lm.stream_generate(model, tokenizer, ids, max_tokens=max_tokens, **extra)

        def flagged():
            for r in stream:
                drafted.append(bool(getattr(r, "from_draft", False)))
                yield r
        return timed(flagged(), counts if draft is not None else None)

    return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--lookup", type=int, default=3, help="prompt lookup's longest n-gram")
    p.add_argument("--lookup-k", type=int, default=6, help="most tokens prompt lookup proposes per step")
    p.add_argument("--draft-k", type=int, default=3, help="most tokens the draft proposes per step (both libraries)")
    p.add_argument("--mlx-lm-draft-tokens", type=int, default=16)
    p.add_argument("--mlx-lm-draft-reps", type=int, default=1, help="0 leaves mlx-lm's draft mode out")
    p.add_argument("--no-record", action="store_true", help="print only; leave RESULTS.md alone")
    args = p.parse_args(argv)

    import mlx_lm as lm

    import mlx_gemma
    from mlx_gemma.prompts import prompt_ids

    target_dir, draft_dir = models.gemma3_270m(None), models.gemma3_270m(4)
    target, tokenizer = mlx_gemma.load(target_dir)
    draft = mlx_gemma.load(draft_dir)
    lm_target, lm_tokenizer = lm.load(str(target_dir))
    lm_draft, _ = lm.load(str(draft_dir))
    ids = {name: prompt_ids(tokenizer, text, chat=True) for name, text in PROMPTS.items()}
    n = args.max_tokens
    variants = {}
    for name, prompt in ids.items():
        variants[f"ours plain / {name}"] = ours(target, tokenizer, prompt, n)
        variants[f"ours lookup / {name}"] = ours(target, tokenizer, prompt, n, prompt_lookup=args.lookup,
                                                num_draft_tokens=args.lookup_k)
        variants[f"ours draft / {name}"] = ours(target, tokenizer, prompt, n, draft_model=draft,
                                               num_draft_tokens=args.draft_k)
        variants[f"mlx-lm plain / {name}"] = mlx_lm(lm_target, lm_tokenizer, prompt, n)
        if args.mlx_lm_draft_reps:
            variants[f"mlx-lm plain short / {name}"] = mlx_lm(lm_target, lm_tokenizer, prompt,
                                                              args.mlx_lm_draft_tokens)
            variants[f"mlx-lm draft / {name}"] = mlx_lm(lm_target, lm_tokenizer, prompt, args.mlx_lm_draft_tokens,
                                                        lm_draft, args.draft_k)
    short = {v for v in variants if "short" in v or v.startswith("mlx-lm draft")}

    for name, prompt in ids.items():  # warm-up: compile and allocate once, untimed
        ours(target, tokenizer, prompt, 4)()
        ours(target, tokenizer, prompt, 4, draft_model=draft, num_draft_tokens=args.draft_k)()
        mlx_lm(lm_target, lm_tokenizer, prompt, 4)()
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for rep in range(args.reps):
        for v, run in variants.items():
            if v in short and rep >= args.mlx_lm_draft_reps:
                continue
            runs[v].append(run())
            r = runs[v][-1]
            print(f"rep {rep} {v}: {len(r['tokens'])} tokens, decode {r['decode_tps']:.2f} tok/s, "
                  f"e2e {r['e2e_tps']:.2f} tok/s" + (f", accepted {r['accepted']}/{r['proposed']}"
                                                     if "accepted" in r else ""), flush=True)

    def plain_of(v):
        lib, _, prompt = v.partition(" / ")
        base = "mlx-lm plain short" if v in short else lib.split()[0] + " plain"
        return f"{base} / {prompt}"

    rows = [["variant", "tokens", "decode tok/s", "end-to-end tok/s", "accepted / proposed",
             "decode vs plain", "end-to-end vs plain"]]
    payload = {"max_tokens": n, "reps": args.reps, "variants": {}}
    exact = []
    for v, rs in runs.items():
        if not rs:
            continue
        base = runs[plain_of(v)]
        ratios = {key: statistics.median(r[key] / b[key] for r, b in zip(rs, base)) for key in ("decode_tps", "e2e_tps")}
        dec, e2e = (statistics.median(r[k] for r in rs) for k in ("decode_tps", "e2e_tps"))
        counts = "-"
        if "accepted" in rs[0]:
            a, q = rs[0]["accepted"], rs[0]["proposed"]
            counts = f"{a}/{q}" if q is not None else f"{a} kept"
        rows.append([v, str(len(rs[0]["tokens"])), f"{dec:.2f}", f"{e2e:.2f}", counts,
                     f"{ratios['decode_tps']:.2f}x", f"{ratios['e2e_tps']:.2f}x"])
        payload["variants"][v] = {"decode_tps": dec, "e2e_tps": e2e, "ratio_vs_plain": ratios,
                                  "tokens": len(rs[0]["tokens"])}
        if v.startswith("ours") and "plain" not in v:
            same = all(r["tokens"] == base[0]["tokens"] for r in rs)
            exact.append(f"{v}: {'identical to' if same else 'DIFFERS from'} ours plain greedy "
                         f"({len(rs[0]['tokens'])} tokens)")
            payload["variants"][v]["greedy_equal_plain"] = same
    same_lm = runs["ours plain / quote"][0]["tokens"] == runs["mlx-lm plain / quote"][0]["tokens"]
    exact.append(f"ours plain / quote vs mlx-lm plain / quote: {'identical' if same_lm else 'different'} tokens")
    text = {name: tokenizer.decode(runs[f"ours plain / {name}"][0]["tokens"]) for name in ids}
    body = (f"Gemma 3 270M (packaged GGUF) in bf16 as the target, its 4-bit conversion as the draft; {n} new "
            f"tokens at most, greedy; {args.reps} alternating repetitions after a warm-up (mlx-lm's draft mode: "
            f"{args.mlx_lm_draft_reps} on {args.mlx_lm_draft_tokens} tokens, against mlx-lm plain on as many); "
            f"prompt lookup n = {args.lookup}, k = {args.lookup_k}; draft k = {args.draft_k}; ratios are medians "
            f"of per-repetition ratios to the same library's plain decoding on the same prompt. Prompts "
            f"(chat template): {len(ids['quote'])} tokens (a summary quoting its source), {len(ids['free'])} "
            f"tokens (a poem).\n\n" + common.table(rows) + "\n\nGreedy exactness:\n\n"
            + "\n".join(f"- {line}" for line in exact)
            + "\n\nPlain greedy outputs: " + "; ".join(f"{k}: {t[:300]!r}" for k, t in text.items()) + "\n")
    return common.finish("bench_speculative", argv, args.no_record, body, payload)


if __name__ == "__main__":
    sys.exit(main())
