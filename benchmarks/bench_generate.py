"""Generation speed and memory: mlx_gemma against mlx-lm (and llama.cpp) on the same weights.

Both libraries load the same folder (our converter's output loads in mlx-lm
unchanged) and generate greedily through their public streaming APIs, text
detokenized as a user sees it: `mlx_gemma.stream_generate` /
`mlx_lm.stream_generate` for one prompt, `mlx_gemma.stream_batch_generate` /
`mlx_lm`'s `BatchGenerator` for four.  The end-of-sequence ids are masked by
the same logits processor in both, so every run makes exactly `--max-tokens`
tokens.  Runs alternate A B A B; the report gives medians, spreads (+-, half
the range) and ours / mlx-lm.

    python benchmarks/bench_generate.py                       # every case (slow on a CPU)
    python benchmarks/bench_generate.py --models 270m-bf16 270m-4bit --batch-sizes 1
    python benchmarks/bench_generate.py --models e2b-bf16 e2b-4bit      # Gemma 4 E2B-shaped, 10 layers

Figures: prefill tokens/s (prompt tokens / time to the first token), decode
tokens/s (tokens after the first, all rows, per second), time to first token,
memory (the model's weights + the run's peak above what was allocated before
it), and for batch 1 the share of the machine's memory bandwidth that decoding
reaches (weight bytes per token x tokens/s / bandwidth).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).parent))

import common  # noqa: E402
import models  # noqa: E402

FILLER = ("The history of astronomy is the story of people looking up and asking what the lights in "
          "the sky are, how far away they lie, and why they move as they do. ")


def prompt_ids(tokenizer, length: int, row: int = 0) -> list[int]:
    """`length` ids: <bos> then filler text, starting `row` words in so rows differ."""
    words = (FILLER * (length // 8 + 8)).split()
    ids = tokenizer.encode(" ".join(words[row * 3:]), add_bos=True)
    return ids[:length]


def eos_mask(vocab_size: int, ids) -> mx.array:
    mask = mx.zeros((vocab_size,), mx.float32)
    return mask.at[mx.array(sorted(ids))].add(-float("inf"))


def _speeds(prompt_tokens: int, rows: int, steps: int, tic: float, first: float, end: float) -> dict:
    return {"prefill_tps": prompt_tokens / (first - tic), "decode_tps": rows * (steps - 1) / max(end - first, 1e-9),
            "ttft_s": first - tic}


def ours_runner(model, tokenizer, prompts, max_tokens, mask):
    from mlx_gemma.generate import stream_batch_generate, stream_generate

    ban = lambda tokens, logits: logits + mask  # noqa: E731
    n_prompt = sum(len(p) for p in prompts)

    def body():
        tic, first, steps = time.perf_counter(), None, 0
        if len(prompts) == 1:
            stream = stream_generate(model, tokenizer, prompts[0], max_tokens=max_tokens, logits_processors=[ban])
        else:
            stream = stream_batch_generate(model, tokenizer, prompts, max_tokens=max_tokens,
                                           logits_processors=[ban])
        for _ in stream:
            first = first or time.perf_counter()
            steps += 1
        return _speeds(n_prompt, len(prompts), steps, tic, first, time.perf_counter())

    return lambda: common.memory_run(body)


def mlx_lm_runner(model, tokenizer, prompts, max_tokens, mask):
    import mlx_lm
    from mlx_lm.generate import BatchGenerator

    ban = lambda tokens, logits: logits + mask  # noqa: E731
    n_prompt = sum(len(p) for p in prompts)

    def body():
        tic, first, steps = time.perf_counter(), None, 0
        if len(prompts) == 1:
            for _ in mlx_lm.stream_generate(model, tokenizer, prompts[0], max_tokens=max_tokens,
                                            logits_processors=[ban]):
                first = first or time.perf_counter()
                steps += 1
        else:
            gen = BatchGenerator(model, max_tokens=max_tokens, logits_processors=[ban])
            gen.insert(prompts)
            detokenizers = {}
            while responses := gen.next_generated():
                first = first or time.perf_counter()
                steps += 1
                for r in responses:  # detokenize as a user would, as ours does
                    d = detokenizers.setdefault(r.uid, tokenizer.detokenizer)  # a fresh one per row
                    d.add_token(r.token)
            gen.close()
        return _speeds(n_prompt, len(prompts), steps, tic, first, time.perf_counter())

    return lambda: common.memory_run(body)


def llama_cpp_runner(gguf: Path, prompt: list[int], max_tokens: int, eos: set[int]):
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=max(2048, len(prompt) + max_tokens + 8), n_batch=512,
                n_threads=len(os.sched_getaffinity(0)), verbose=False)

    def body():
        llm.reset()
        tic, first, steps = time.perf_counter(), None, 0
        for _ in llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0, stream=True,
                                       logit_bias={i: -1e9 for i in eos}):
            first = first or time.perf_counter()
            steps += 1
        return _speeds(len(prompt), 1, steps, tic, first, time.perf_counter())

    return lambda: common.Run(body())


def model_folder(name: str, gemma2_layers: int | None, gemma4_layers: int = 10) -> Path:
    family, precision = name.rsplit("-", 1)
    bits = None if precision == "bf16" else int(precision.removesuffix("bit"))
    if family == "270m":
        return models.gemma3_270m(bits)
    if family == "e2b":
        return models.gemma4_e2b_random(bits, gemma4_layers)
    return models.gemma2_2b_random(bits, gemma2_layers)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    cases = ["270m-bf16", "270m-4bit", "2b-bf16", "2b-4bit", "e2b-bf16", "e2b-4bit"]
    p.add_argument("--models", nargs="+", default=cases, choices=cases)
    p.add_argument("--prompt-lengths", nargs="+", type=int, default=[128, 1024])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 4])
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--gemma2-layers", type=int, default=None, help="cut the 2B-shaped model to this many layers")
    p.add_argument("--gemma4-layers", type=int, default=10,
                   help="cut the Gemma 4 E2B-shaped model to this many layers (a multiple of 5; 35 is E2B)")
    p.add_argument("--no-llama-cpp", action="store_true", help="skip llama.cpp even when installed")
    p.add_argument("--no-record", action="store_true", help="print only; leave RESULTS.md alone")
    p.add_argument("--section", default=None, help="record under a section of this name in RESULTS.md")
    args = p.parse_args(argv)

    import mlx_lm

    import mlx_gemma

    bandwidth = common.bandwidth_ceiling()
    rows = [["case", "library", "prefill tok/s", "decode tok/s", "TTFT s", "memory GB", "bandwidth used"]]
    payload = {"bandwidth_gbs": bandwidth, "cases": []}
    folders = []
    for name in args.models:
        folder = model_folder(name, args.gemma2_layers, args.gemma4_layers)
        folders.append(f"{name} = `{folder.name}`")
        ours_model, ours_tok = mlx_gemma.load(folder)
        theirs_model, theirs_tok = mlx_lm.load(str(folder))
        eos = set(ours_tok.eos_token_ids) | set(theirs_tok.eos_token_ids)
        mask = eos_mask(ours_model.args.vocab_size, eos)
        weights_gb = {"mlx_gemma": common.weight_bytes(ours_model) / 1e9,
                      "mlx-lm": common.weight_bytes(theirs_model) / 1e9}
        for length in args.prompt_lengths:
            for batch in args.batch_sizes:
                prompts = [prompt_ids(ours_tok, length, row) for row in range(batch)]
                runners = {"mlx_gemma": ours_runner(ours_model, ours_tok, prompts, args.max_tokens, mask),
                           "mlx-lm": mlx_lm_runner(theirs_model, theirs_tok, prompts, args.max_tokens, mask)}
                if (name == "270m-bf16" and batch == 1 and not args.no_llama_cpp
                        and _has("llama_cpp")):
                    from mlx_gemma.default_model import packaged_gguf_path

                    runners["llama.cpp"] = llama_cpp_runner(packaged_gguf_path(), prompts[0], args.max_tokens, eos)
                series = common.alternate(runners, args.reps)
                case = f"{name} prompt {length} batch {batch}"
                entry = {"case": case, "libraries": {}}
                for lib, s in series.items():
                    mem = weights_gb.get(lib, 0.0) + (s.median("peak_extra_gb") if "peak_extra_gb" in s.runs[0].metrics
                                                      else float("nan"))
                    used = (weights_gb.get(lib, float("nan")) * s.median("decode_tps") / bandwidth
                            if batch == 1 else float("nan"))
                    rows.append([case, lib, f"{s.median('prefill_tps'):.1f} ±{s.spread('prefill_tps'):.0%}",
                                 f"{s.median('decode_tps'):.2f} ±{s.spread('decode_tps'):.0%}",
                                 f"{s.median('ttft_s'):.2f}", f"{mem:.3f}" if mem == mem else "-",
                                 f"{used:.0%}" if used == used else "-"])
                    entry["libraries"][lib] = {k: s.median(k) for k in s.runs[0].metrics} | {"memory_gb": mem}
                ours, theirs = entry["libraries"]["mlx_gemma"], entry["libraries"]["mlx-lm"]
                entry["ratio_vs_mlx_lm"] = {k: common.ratio(ours[k], theirs[k])
                                            for k in ("prefill_tps", "decode_tps", "memory_gb")}
                r = entry["ratio_vs_mlx_lm"]
                rows.append([case, "**ours / mlx-lm**", f"**{r['prefill_tps']:.2f}x**", f"**{r['decode_tps']:.2f}x**",
                             "", f"**{r['memory_gb']:.2f}x**", ""])
                if "llama.cpp" in entry["libraries"]:
                    ll = entry["libraries"]["llama.cpp"]
                    entry["ratio_vs_llama_cpp"] = {k: common.ratio(ours[k], ll[k]) for k in ("prefill_tps", "decode_tps")}
                    q = entry["ratio_vs_llama_cpp"]
                    rows.append([case, "ours / llama.cpp", f"{q['prefill_tps']:.2f}x", f"{q['decode_tps']:.2f}x",
                                 "", "", ""])
                payload["cases"].append(entry)
                print(common.table(rows[:1] + rows[-(len(series) + 1 + ("llama.cpp" in series)):]), flush=True)
        del ours_model, theirs_model
        mx.clear_cache()
    body = (f"Memory bandwidth ceiling (a timed 1 GiB `a + 1`): {bandwidth:.1f} GB/s. "
            f"{args.max_tokens} new tokens, greedy, {args.reps} alternating repetitions after a warm-up; "
            f"± is half the range over the median. llama.cpp runs the packaged Q4_K_M GGUF itself. "
            f"Model folders: {', '.join(folders)}.\n\n"
            + common.table(rows))
    return common.finish("bench_generate", argv, args.no_record, body, payload, args.section)


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


if __name__ == "__main__":
    sys.exit(main())
