"""LoRA fine-tuning speed and memory: mlx_gemma against mlx-lm on the same run.

The same model folder, the same text examples (all `--seq-len` tokens, so no
padding), LoRA of the same rank and scale on the same projections of every
layer, Adam at the same learning rate, `--iters` steps of `--batch-size`, each
library through its own public training loop (`mlx_gemma.tuner.trainer.train`,
`mlx_lm.tuner.trainer.train`).  Runs alternate A B A B; each run trains for
`--iters` steps with a fresh optimizer.  Reported: training tokens/s and the
run's peak memory above what was allocated before it (gradients, optimizer
state, activations, logits).

    python benchmarks/bench_lora.py --iters 10 --batch-size 2 --seq-len 256
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import mlx.optimizers as optim

sys.path.insert(0, str(Path(__file__).parent))

import common  # noqa: E402
import models  # noqa: E402
from bench_generate import prompt_ids  # noqa: E402

KEYS = ("q_proj", "v_proj")  # keras-hub's default targets


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=["270m-bf16", "2b-bf16"], default="270m-bf16")
    p.add_argument("--gemma2-layers", type=int, default=None)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--learning-rate", type=float, default=1e-5)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--no-record", action="store_true")
    p.add_argument("--section", default=None, help="record under a section of this name in RESULTS.md")
    args = p.parse_args(argv)

    import mlx_lm
    from mlx_lm.tuner import trainer as their_trainer
    from mlx_lm.tuner.datasets import CacheDataset, TextDataset
    from mlx_lm.tuner.utils import linear_to_lora_layers

    import mlx_gemma
    from mlx_gemma.tuner import trainer as our_trainer
    from mlx_gemma.tuner.lora import enable_lora

    folder = (models.gemma3_270m(None) if args.model == "270m-bf16"
              else models.gemma2_2b_random(None, args.gemma2_layers))
    ours, tokenizer = mlx_gemma.load(folder)
    theirs, their_tok = mlx_lm.load(str(folder))
    n_examples = args.batch_size * 4
    # The texts round-trip through the tokenizer, so both libraries see the same ids.
    texts = [tokenizer.decode(prompt_ids(tokenizer, args.seq_len + 1, row)[1:]) for row in range(n_examples)]
    our_examples = [(tokenizer.encode(t, add_bos=True), 0) for t in texts]
    their_examples = CacheDataset(TextDataset([{"text": t} for t in texts], their_tok._tokenizer))
    tokens_per_run = sum(min(len(ids), args.seq_len + 1) - 1 for ids, _ in our_examples[:args.batch_size]) * args.iters

    enable_lora(ours, rank=args.rank, target_names=KEYS, scale=20.0)
    theirs.freeze()
    linear_to_lora_layers(theirs, len(theirs.layers), {"rank": args.rank, "scale": 20.0, "dropout": 0.0,
                                                         "keys": [f"self_attn.{k}" for k in KEYS]})
    scratch = Path(tempfile.mkdtemp(prefix="bench_lora"))

    def ours_run():
        def body():
            tic = time.perf_counter()
            our_trainer.train(ours, optim.Adam(learning_rate=args.learning_rate), our_examples, None,
                              our_trainer.TrainingArgs(batch_size=args.batch_size, iters=args.iters,
                                                       steps_per_report=args.iters, steps_per_eval=10**9,
                                                       save_every=10**9, adapter_path=str(scratch / "ours")),
                              pad_id=max(tokenizer.pad_id, 0))
            return {"train_tps": tokens_per_run / (time.perf_counter() - tic)}
        return common.memory_run(body)

    def theirs_run():
        def body():
            tic = time.perf_counter()
            their_trainer.train(theirs, optim.Adam(learning_rate=args.learning_rate), their_examples, None,
                                their_trainer.TrainingArgs(batch_size=args.batch_size, iters=args.iters,
                                                           steps_per_report=args.iters, steps_per_eval=10**9,
                                                           steps_per_save=10**9, max_seq_length=args.seq_len + 1,
                                                           adapter_file=str(scratch / "theirs.safetensors")))
            return {"train_tps": tokens_per_run / (time.perf_counter() - tic)}
        return common.memory_run(body)

    series = common.alternate({"mlx_gemma": ours_run, "mlx-lm": theirs_run}, args.reps)
    rows = [["library", "train tok/s", "peak above model GB"]]
    meds = {}
    for lib, s in series.items():
        meds[lib] = {k: s.median(k) for k in s.runs[0].metrics}
        rows.append([lib, f"{meds[lib]['train_tps']:.1f} ±{s.spread('train_tps'):.0%}",
                     f"{meds[lib]['peak_extra_gb']:.3f}"])
    r = {k: common.ratio(meds["mlx_gemma"][k], meds["mlx-lm"][k]) for k in meds["mlx_gemma"]}
    rows.append(["**ours / mlx-lm**", f"**{r['train_tps']:.2f}x**", f"**{r['peak_extra_gb']:.2f}x**"])
    body = (f"{args.model}, LoRA rank {args.rank} on {', '.join(KEYS)} of every layer, batch {args.batch_size} x "
            f"{args.seq_len} tokens, {args.iters} Adam steps per run, {args.reps} alternating repetitions after a "
            f"warm-up.\n\n" + common.table(rows))
    payload = {"model": args.model, "libraries": meds, "ratio_vs_mlx_lm": r}
    return common.finish("bench_lora", argv, args.no_record, body, payload, args.section)


if __name__ == "__main__":
    sys.exit(main())
