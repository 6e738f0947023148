"""Fine-tuning at real sizes: keras-style fit, full fine-tuning against mlx-lm, optimizer state.

Every run is a process of its own (this script started again with `--worker`), so each
library's peak is its own: `mx.get_peak_memory()` (MLX's allocations, weights included)
and the process's max RSS.  Runs alternate A B A B over `--reps`.  Cases:

(a) the seed's example, `GemmaCausalLM.from_preset(folder, sequence_length=L).fit(x=[two
    sentences], batch_size=2)`, at L = 1024 against L = 32: time of `fit` and peak;
(b) full fine-tuning, batch 2 x ~250 real tokens, `--steps` Adam steps at one learning rate on
    one batch (so every library trains on the same batch at every step): ours through `fit` (every weight trains, keras-style) and through our
    training loop as `--fine-tune-type full` (every weight of every block, as mlx-lm's CLI),
    against mlx-lm's trainer as its `--fine-tune-type full` sets it up (and, with
    `--mlx-lm-every-weight`, mlx-lm's trainer training every weight, fit's set): peak,
    tokens/s (the real target tokens over the whole training call, compilation included),
    the training loss it reported at each step (the first: the untrained model's, the same for
    all), and the loss over the batch after training (each library's own evaluate);
(c) LoRA: bench_lora.py (run it; its section of RESULTS.md has the figures);
(d) optimizer state (`--cases d`): our loop, `--opt-steps` steps of AdamW with moments in
    bf16 (the default) or float32, and Adafactor: the loss after training and the peak.

    python benchmarks/bench_fit.py                  # a and b, one repetition (~15 min on a 2-core CPU)
    python benchmarks/bench_fit.py --cases d --opt-steps 8
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_flatten

sys.path.insert(0, str(Path(__file__).parent))

import common  # noqa: E402
import models  # noqa: E402
from bench_generate import prompt_ids  # noqa: E402

SEED_TEXTS = ["The quick brown fox jumped.", "I forgot my homework."]


def texts_and_examples(tokenizer, args):
    """The training texts, `--tokens` tokens each (round-tripped through the tokenizer, so every library
    sees the same ids), and our (ids, offset) examples of them: BOS + text + EOS, as mlx-lm's TextDataset
    and keras-hub's preprocessor make them.  One batch, trained on at every step (every library then
    sees the same batch at the same step, whatever order its loader would take), or with `--distinct`
    a batch per step."""
    count = args.batch_size * (args.steps if args.distinct else 1)
    texts = [tokenizer.decode(prompt_ids(tokenizer, args.tokens + 1, row)[1:]) for row in range(count)]
    examples = [(tokenizer.encode(t, add_bos=True, add_eos=True), 0) for t in texts]
    return texts, examples


def measured(train, n_params: int, weights: int) -> dict:
    """Run `train()` -> (losses, a function giving the loss after training); add seconds, MLX's peak and
    the process's max RSS, both taken before that loss is computed."""
    mx.synchronize()
    mx.reset_peak_memory()
    tic = time.perf_counter()
    losses, after = train()
    seconds = time.perf_counter() - tic
    out = {"seconds": seconds, "peak_gb": mx.get_peak_memory() / 1e9, "trainable": n_params,
           "weights_gb": weights / 1e9, "rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
           "losses": losses}
    return {**out, "loss_after": after() if after else None}


def worker_seed_fit(folder, args):
    from mlx_gemma import GemmaCausalLM

    lm = GemmaCausalLM.from_preset(folder, sequence_length=args.sequence_length)
    weights = common.weight_bytes(lm.backbone.model)
    return measured(lambda: (lm.fit(x=SEED_TEXTS, batch_size=2, verbose=0).history["loss"], None), 0, weights)


def worker_ours(folder, args):
    """Our training loop; `--optimizer`: which one; `--scope`: blocks (as mlx-lm's CLI) or every weight (fit's)."""
    import mlx_gemma
    from mlx_gemma.tuner import trainer
    from mlx_gemma.tuner.full import enable_full

    model, tokenizer = mlx_gemma.load(folder)
    _, examples = texts_and_examples(tokenizer, args)
    if args.scope == "blocks":
        enable_full(model, -1)
    name, _, state = args.optimizer.partition(":")
    optimizer = trainer.build_optimizer(name, args.learning_rate, state_dtype=state or "param")
    steps = args.steps
    losses = []
    targs = trainer.TrainingArgs(batch_size=args.batch_size, iters=steps, steps_per_report=1,
                                 steps_per_eval=10**9, save_every=10**9, seed=args.seed)

    def train():
        trainer.train(model, optimizer, examples, None, targs, pad_id=max(tokenizer.pad_id, 0),
                      report=lambda info: losses.append(info["train_loss"]))
        return losses, lambda: trainer.evaluate(model, examples, args.batch_size)

    n = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    return measured(train, n, common.weight_bytes(model))


def worker_fit(folder, args):
    """keras-style fit: every weight trains (the tied embedding too), Adam at the same learning rate."""
    from mlx_gemma import GemmaCausalLM
    from mlx_gemma.tuner import trainer

    lm = GemmaCausalLM.from_preset(folder, sequence_length=args.tokens + 32)  # every text whole
    lm.compile(optimizer="adam", learning_rate=args.learning_rate)
    texts, examples = texts_and_examples(lm.preprocessor.tokenizer, args)

    def train():  # one batch: an epoch is a step
        history = lm.fit(x=texts, batch_size=args.batch_size, epochs=args.steps, shuffle=False, verbose=0,
                         seed=args.seed)
        return history.history["loss"], lambda: trainer.evaluate(lm.backbone.model, examples, args.batch_size)

    n = sum(v.size for _, v in tree_flatten(lm.backbone.model.trainable_parameters()))
    return measured(train, n, common.weight_bytes(lm.backbone.model))


def worker_mlx_lm(folder, args):
    """mlx-lm's trainer, set up as its `--fine-tune-type full --num-layers -1` does (or every weight)."""
    import mlx_lm
    from mlx_lm.tuner import trainer as their_trainer

    import mlx_gemma

    model, _ = mlx_lm.load(str(folder))
    # Our ids, as (ids, offset) items its loader takes: its TextDataset would tokenize through the HF
    # tokenizer, which need not add BOS as keras-hub's preprocessor and ours do.
    data = texts_and_examples(mlx_gemma.GemmaTokenizer.from_folder(folder), args)[1]
    model.freeze()
    for block in model.layers if args.scope == "blocks" else [model]:
        block.unfreeze()
    losses = []

    class Reports(their_trainer.TrainingCallback):
        def on_train_loss_report(self, info):
            losses.append(info["train_loss"])

    scratch = Path(tempfile.mkdtemp(prefix="bench_fit"))
    targs = their_trainer.TrainingArgs(batch_size=args.batch_size, iters=args.steps, steps_per_report=1,
                                       steps_per_eval=10**9, steps_per_save=10**9, max_seq_length=args.tokens + 32,
                                       adapter_file=str(scratch / "adapters.safetensors"))

    def train():
        their_trainer.train(model, optim.Adam(learning_rate=args.learning_rate), data, None, targs,
                            training_callback=Reports())
        return losses, lambda: real_target_loss(model, data)

    n = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    return measured(train, n, common.weight_bytes(model))


def real_target_loss(model, examples) -> float:
    """The mean next-token cross-entropy over each row's real targets, from an mlx-lm model's logits:
    our evaluate's loss.  (mlx-lm 0.32's own loss also counts one padding target per row, the id
    after the last token: its default_loss masks steps 1..length, not 1..length - 1.)"""
    import mlx.nn as nn

    total, count = 0.0, 0
    for ids, _ in examples:
        x = mx.array([ids])
        ce = nn.losses.cross_entropy(model(x[:, :-1]).astype(mx.float32), x[:, 1:])
        total, count = total + ce.sum().item(), count + len(ids) - 1
    return total / count


WORKERS = {"seed_fit": worker_seed_fit, "ours": worker_ours, "fit": worker_fit, "mlx_lm": worker_mlx_lm}


# (label, worker, its settings): what each case runs, in the order the runs alternate.
CASES = {
    "a": [("fit, sequence_length 1024", "seed_fit", ["--sequence-length", "1024"]),
          ("fit, sequence_length 32", "seed_fit", ["--sequence-length", "32"])],
    "b": [("ours, fit (every weight)", "fit", []),
          ("ours, --fine-tune-type full (blocks)", "ours", ["--scope", "blocks"]),
          ("mlx-lm, --fine-tune-type full (blocks)", "mlx_lm", ["--scope", "blocks"])],
    "b+": [("mlx-lm trainer, every weight", "mlx_lm", ["--scope", "all"])],
    "d": [("AdamW, bf16 moments (default)", "ours", ["--scope", "blocks", "--optimizer", "adamw"]),
          ("AdamW, float32 moments", "ours", ["--scope", "blocks", "--optimizer", "adamw:float32"]),
          ("Adafactor", "ours", ["--scope", "blocks", "--optimizer", "adafactor"])],
}


def run_worker(worker: str, settings: list[str], args) -> dict:
    common_settings = ["--model", args.model, "--tokens", str(args.tokens), "--batch-size", str(args.batch_size),
                       "--steps", str(args.steps),
                       "--learning-rate", str(args.learning_rate), "--seed", str(args.seed)]
    done = subprocess.run([sys.executable, __file__, "--worker", worker, *common_settings, *settings],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"worker {worker} {settings} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def alternate(labels: list[tuple[str, str, list[str]]], args) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {label: [] for label, _, _ in labels}
    for _ in range(args.reps):
        for label, worker, settings in labels:
            runs[label].append(run_worker(worker, settings, args))
            print(f"{label}: {json.dumps(runs[label][-1])}", file=sys.stderr, flush=True)
    return runs


def median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def fmt_losses(losses) -> str:
    return ", ".join(f"{x:.3f}" for x in losses)


def floor_gb(run: dict) -> float:
    """Weights + a bf16 gradient and two bf16 Adam moments per trainable weight (mlx's Adam keeps the
    moments in the weights' dtype): what any Adam step on a bf16 model must hold."""
    return run["weights_gb"] + run["trainable"] * 6 / 1e9


def section_a(runs) -> str:
    (long, a), (short, b) = runs.items()
    rows = [["fit", "seconds", "peak GB (MLX)", "max RSS GB"]]
    for label, r in runs.items():
        rows.append([label, f"{median(r, 'seconds'):.1f}", f"{median(r, 'peak_gb'):.3f}", f"{median(r, 'rss_gb'):.2f}"])
    rows.append(["**1024 / 32**", f"**{common.ratio(median(a, 'seconds'), median(b, 'seconds')):.2f}x**",
                 f"**{common.ratio(median(a, 'peak_gb'), median(b, 'peak_gb')):.2f}x**",
                 f"{common.ratio(median(a, 'rss_gb'), median(b, 'rss_gb')):.2f}x"])
    return ("(a) The seed's example: `GemmaCausalLM.from_preset(folder, sequence_length=L).fit(x=[\"The quick "
            "brown fox jumped.\", \"I forgot my homework.\"], batch_size=2)`, every weight training.\n\n"
            + common.table(rows))


def section_b(runs, args) -> str:
    rows = [["run", "trainable", "peak GB (MLX)", "peak / floor", "max RSS GB", "tok/s",
             "train loss by step", "loss after"]]
    for label, r in runs.items():
        tokens = args.batch_size * args.steps * (args.tokens + 1)
        rows.append([label, f"{r[0]['trainable'] / 1e6:.0f}M", f"{median(r, 'peak_gb'):.3f}",
                     f"{median(r, 'peak_gb') / floor_gb(r[0]):.2f}x", f"{median(r, 'rss_gb'):.2f}",
                     f"{tokens / median(r, 'seconds'):.1f}", fmt_losses(r[0]["losses"]),
                     f"{median(r, 'loss_after'):.4f}"])
    names = list(runs)
    ours, theirs = runs[names[1]], runs[names[2]]
    line = (f"\n\nOurs / mlx-lm, `--fine-tune-type full`: peak {median(ours, 'peak_gb') / median(theirs, 'peak_gb'):.2f}x, "
            f"max RSS {median(ours, 'rss_gb') / median(theirs, 'rss_gb'):.2f}x, "
            f"tokens/s {median(theirs, 'seconds') / median(ours, 'seconds'):.2f}x.")
    if len(names) > 3:
        every = runs[names[3]]
        line += (f" fit / mlx-lm's trainer on every weight: peak "
                 f"{median(runs[names[0]], 'peak_gb') / median(every, 'peak_gb'):.2f}x, tokens/s "
                 f"{median(every, 'seconds') / median(runs[names[0]], 'seconds'):.2f}x.")
    return (f"(b) Full fine-tuning, batch {args.batch_size} x {args.tokens} tokens of text (BOS + text + EOS), "
            f"{args.steps} Adam steps at {args.learning_rate:g} on that one batch, the same for every run. The floor: weights + "
            "a bf16 gradient and two bf16 Adam moments per trainable weight. tok/s: the real target tokens over "
            "the whole training call (compilation included). Train loss by step: as each library reported it "
            "(step 1: the untrained model; mlx-lm's also counts one padding target per row, the id after the last token). "
            "Loss after: the mean cross-entropy over the batch's real targets after the last step, the same "
            "definition for every run.\n\n" + common.table(rows) + line)


def section_d(runs, args) -> str:
    rows = [["optimizer", "peak GB (MLX)", "train loss by step", "loss after"]]
    for label, r in runs.items():
        rows.append([label, f"{median(r, 'peak_gb'):.3f}", fmt_losses(r[0]["losses"]), f"{median(r, 'loss_after'):.4f}"])
    return (f"(d) Optimizer state: our loop, every weight of every block, batch {args.batch_size} x {args.tokens}, "
            f"{args.opt_steps} steps at {args.learning_rate:g}, distinct texts each step; loss after: over those "
            "texts.\n\n" + common.table(rows))


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", default="a,b", help="a, b, c, d (comma-separated); default a,b")
    p.add_argument("--mlx-lm-every-weight", action="store_true", help="(b) also mlx-lm's trainer on every weight")
    p.add_argument("--model", default=None, help="model folder (default: the packaged Gemma 3 270M, bf16)")
    p.add_argument("--tokens", type=int, default=250)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--opt-steps", type=int, default=6)
    p.add_argument("--learning-rate", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--no-record", action="store_true")
    p.add_argument("--section", default=None)
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--sequence-length", type=int, default=1024, help=argparse.SUPPRESS)
    p.add_argument("--scope", choices=["blocks", "all"], default="blocks", help=argparse.SUPPRESS)
    p.add_argument("--optimizer", default="adam", help=argparse.SUPPRESS)
    p.add_argument("--distinct", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    if args.worker:
        print(json.dumps(WORKERS[args.worker](Path(args.model), args)))
        return 0
    args.model = str(args.model or models.gemma3_270m(None))
    cases = args.cases.split(",")
    parts, payload = [], {}
    if "a" in cases:
        runs = alternate(CASES["a"], args)
        parts.append(section_a(runs))
        payload["a"] = runs
    if "b" in cases:
        runs = alternate(CASES["b"] + (CASES["b+"] if args.mlx_lm_every_weight else []), args)
        parts.append(section_b(runs, args))
        payload["b"] = runs
    if "c" in cases:
        parts.append("(c) LoRA: `python benchmarks/bench_lora.py` (its own section below).")
        subprocess.run([sys.executable, str(Path(__file__).with_name("bench_lora.py"))], check=True)
    if "d" in cases:
        runs = alternate([(label, worker, [*settings, "--steps", str(args.opt_steps), "--distinct"]) for label, worker, settings in CASES["d"]], args)
        parts.append(section_d(runs, args))
        payload["d"] = runs
    body = f"Gemma 3 270M bf16 ({args.model}), {args.reps} repetition(s), each run a process of its own.\n\n"
    return common.finish("bench_fit", argv, args.no_record, body + "\n\n".join(parts), payload,
                         args.section or (None if cases == ["a", "b"] else "-".join(cases)))


if __name__ == "__main__":
    sys.exit(main())
