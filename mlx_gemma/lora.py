"""`python -m mlx_gemma.lora`: LoRA / QLoRA / DoRA / full fine-tuning from the command line.

    python -m mlx_gemma.lora --model PATH --data DIR --train --iters 600 --batch-size 4 \\
        --learning-rate 1e-5 --rank 8 --num-layers 16 --adapter-path adapters --mask-prompt
    python -m mlx_gemma.lora --model PATH --data DIR --train --fine-tune-type full --num-layers -1 \\
        --adapter-path my-model        # my-model/ is then a complete model folder

Flags follow mlx-lm's `mlx_lm.lora`; `-c config.json` (or `.yaml` when PyYAML
is installed) supplies any of them, flags on the command line win.  A
quantized model folder trains as QLoRA (the base stays quantized).

The library lives in `mlx_gemma.tuner` (adapters, training loop, data), as mlx-lm's
`mlx_lm/lora.py` sits on `mlx_lm/tuner/`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Sequence

import mlx.core as mx

from .api import load
from .arguments import is_integer, is_real
from .cli import run_command
from .errors import TrainingError
from .progress import Progress, format_rate
from .tuner import trainer
from .tuner.datasets import load_datasets, training_images
from .tuner.full import check_full_fine_tunable, check_save_path, enable_full, load_full_weights, save_full_model
from .tuner.lora import (
    ADAPTER_FILE,
    CONFIG_FILE,
    DEFAULT_TARGETS,
    TARGETS,
    DoRALinear,
    LoRALinear,
    adapter_weights,
    apply_lora,
    enable_lora,
    fuse,
    load_adapter_weights,
    load_adapters,
    lora_config,
    lora_layers,
    read_adapter_config,
    save_adapters,
)

# The adapter API re-exported, so the old `from mlx_gemma import lora; lora.enable_lora(...)` keeps working.
__all__ = ["ADAPTER_FILE", "CONFIG_FILE", "DEFAULT_TARGETS", "TARGETS", "DoRALinear", "LoRALinear",
           "adapter_weights", "apply_lora", "enable_lora", "fuse", "load_adapter_weights", "load_adapters",
           "lora_config", "lora_layers", "read_adapter_config", "save_adapters", "main"]

# As mlx-lm: without --num-layers, the last 16 blocks, or every block of a shallower model.
# An explicit count larger than the model stays an error.
DEFAULT_NUM_LAYERS = 16

DEFAULTS = {
    "model": None, "data": "data", "train": False, "test": False, "iters": 1000, "batch_size": 4,
    "learning_rate": 1e-5, "rank": 8, "scale": 20.0, "dropout": 0.0, "num_layers": None,
    "lora_keys": ["q_proj", "v_proj"], "fine_tune_type": "lora", "adapter_path": "adapters",
    "save_every": 100, "resume_adapter_file": None, "grad_checkpoint": False, "mask_prompt": False,
    "max_seq_length": 2048, "seed": 0, "optimizer": "adamw", "weight_decay": 0.0, "lr_schedule": "constant",
    "warmup": 0, "min_lr": 0.0, "grad_accumulation_steps": 1, "steps_per_report": 10, "steps_per_eval": 200,
    "val_batches": 25, "test_batches": -1, "loss_chunk_size": None, "optimizer_state_dtype": "param",
}


# (flag, type or "flag" for a switch, help); the defaults live in DEFAULTS.
FLAGS = [
    ("--model", str, "model folder or hub id (a quantized folder trains as QLoRA)"),
    ("--data", str, "folder with train.jsonl / valid.jsonl / test.jsonl"),
    ("--train", "flag", "train"),
    ("--test", "flag", "report the test-set loss (after training)"),
    ("--iters", int, "optimizer steps"),
    ("--batch-size", int, "examples per batch"),
    ("--learning-rate", float, "peak learning rate"),
    ("--rank", int, "LoRA rank"),
    ("--scale", float, "LoRA scale (alpha / rank); mlx-lm's default 20"),
    ("--dropout", float, "LoRA dropout"),
    ("--num-layers", int, f"adapt the last N blocks (-1: all; default {DEFAULT_NUM_LAYERS}, or all when the model has fewer)"),
    ("--adapter-path", str, "folder to write adapters.safetensors and adapter_config.json; with --fine-tune-type "
     "full, the trained model as a complete folder (config, weights, tokenizer: load it as --model), replaced "
     "atomically at each save. mlx-lm writes a full fine-tune's weights under --adapter-path too, so scripts keep "
     "their flag; only a new folder, an empty one or an earlier model folder is accepted"),
    ("--save-every", int, "save the adapters every K steps (and at the end)"),
    ("--resume-adapter-file", str, "start from these adapter weights (a file or an adapter folder); with "
     "--fine-tune-type full, an earlier run's model folder, or mlx-lm's full-run adapters.safetensors"),
    ("--grad-checkpoint", "flag", "recompute blocks in the backward pass (less memory)"),
    ("--mask-prompt", "flag", "loss on completions / the last model turn only"),
    ("--max-seq-length", int, "truncate longer examples (with a warning)"),
    ("--seed", int, "random seed"),
    ("--weight-decay", float, "weight decay (adamw, sgd)"),
    ("--warmup", int, "linear warm-up steps"),
    ("--min-lr", float, "final learning rate of the cosine schedule"),
    ("--grad-accumulation-steps", int, "micro-batches per optimizer step"),
    ("--steps-per-report", int, "report the training loss every N steps"),
    ("--steps-per-eval", int, "validate every N steps"),
    ("--val-batches", int, "validation batches per evaluation (-1: all)"),
    ("--test-batches", int, "test batches (-1: all)"),
    ("--loss-chunk-size", int, "tokens per cross-entropy chunk (default: 32 MiB of float32 logits on a CPU, 128 MiB on a GPU)"),
]
CHOICES = {"--fine-tune-type": ["lora", "dora", "full"], "--optimizer": ["adamw", "adam", "sgd", "adafactor"],
           "--lr-schedule": ["constant", "cosine"], "--optimizer-state-dtype": ["param", "float32"]}
CHOICE_HELP = {
    "--fine-tune-type": "full: every weight of the last --num-layers blocks (-1: all), as mlx-lm (the embedding, "
                        "tied to the output head, and the final norm stay frozen)",
    "--optimizer-state-dtype": "Adam / AdamW moments in the weights' dtype (param: bf16 for a bf16 model, as mlx-lm "
                               "and torch keep them) or float32 (2x the optimizer memory). Measured on Gemma 3 270M: "
                               "see benchmarks/RESULTS.md, bench_fit",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mlx_gemma.lora", description="Fine-tune Gemma: LoRA adapters or every weight.")
    p.add_argument("-c", "--config", help="a JSON (or YAML, with PyYAML) file of settings; flags win")
    for flag, kind, text in FLAGS:
        if kind == "flag":
            p.add_argument(flag, action="store_true", default=None, help=text)
        else:
            p.add_argument(flag, type=kind, help=text)
    for flag, choices in CHOICES.items():
        default = f"default: {DEFAULTS[flag[2:].replace('-', '_')]}"
        p.add_argument(flag, choices=choices, help=f"{CHOICE_HELP[flag]}; {default}" if flag in CHOICE_HELP else default)
    p.add_argument("--lora-keys", nargs="+", help="projections to adapt (default: q_proj v_proj)")
    return p


def read_config_file(path: str) -> dict:
    file = Path(path)
    if not file.is_file():
        raise TrainingError(f"{file}: no such config file")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TrainingError(f"{file}: not UTF-8 text: {e}") from None
    if file.suffix in (".yaml", ".yml"):
        try:  # deferred: PyYAML is optional, needed only for a YAML config
            import yaml
        except ImportError:
            raise TrainingError(f"{file}: YAML configs need PyYAML (pip install pyyaml); or use JSON") from None
        try:
            config = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise TrainingError(f"{file}: not valid YAML: {e}") from None
    else:
        try:
            config = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as e:
            raise TrainingError(f"{file}: not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise TrainingError(f"{file}: must hold a mapping of settings")
    lora_parameters = config.pop("lora_parameters", None)  # mlx-lm's config spelling
    if lora_parameters is not None:
        if not isinstance(lora_parameters, dict) or set(lora_parameters) - {"rank", "scale", "dropout", "keys"}:
            raise TrainingError(f"{file}: lora_parameters takes rank, scale, dropout and keys")
        config.update({("lora_keys" if k == "keys" else k): v for k, v in lora_parameters.items()})
    unknown = sorted(map(str, set(config) - set(DEFAULTS)))
    if unknown:
        raise TrainingError(f"{file}: unknown settings {', '.join(unknown)}; known: {', '.join(DEFAULTS)}")
    for key, value in config.items():
        _check_setting(file, key, value)
    return config


_KINDS = {flag[2:].replace("-", "_"): kind for flag, kind, _ in FLAGS}


def _check_setting(file: Path, key: str, value) -> None:
    """A config file's value has the type its flag parses to (None leaves the default)."""
    if value is None:
        return
    kind = _KINDS.get(key)
    choices = CHOICES.get("--" + key.replace("_", "-"))
    if choices is not None:
        ok = value in choices
        wanted = "one of " + ", ".join(choices)
    elif key == "lora_keys":
        ok = isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)
        wanted = "a non-empty list of projection names"
    elif kind == "flag":
        ok, wanted = isinstance(value, bool), "true or false"
    elif kind is int:
        ok, wanted = is_integer(value), "an integer"
    elif kind is float:
        ok, wanted = is_real(value), "a finite number"
    else:
        ok, wanted = isinstance(value, str), "a string"
    if not ok:
        raise TrainingError(f"{file}: {key!r} must be {wanted}, got {value!r}")


def settings(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Defaults, overridden by the config file, overridden by flags."""
    args = build_parser().parse_args(argv)
    merged = dict(DEFAULTS)
    if args.config:
        merged.update(read_config_file(args.config))
    merged.update({k: v for k, v in vars(args).items() if v is not None and k != "config"})
    return argparse.Namespace(**merged)


def _printer(progress: Progress | None, quiet: bool):
    def report(info: dict) -> None:
        if quiet:
            return
        if "val_loss" in info:
            line = f"Iter {info['step']}: val loss {info['val_loss']:.3f}"
        else:
            line = (f"Iter {info['step']}: train loss {info['train_loss']:.3f}, lr {info['learning_rate']:.3e}, "
                    f"{format_rate(info['tokens_per_second'])} tok/s, peak mem {info['peak_memory_gb']:.3f} GB")
        if progress is not None and progress.live:
            progress.update(info["step"], line)
        print(line, file=sys.stderr if progress is not None and progress.live else sys.stdout, flush=True)
    return report


def _prepare_model(model, args: argparse.Namespace):
    """Make the parameters `--fine-tune-type` trains trainable (adapters, or whole blocks), load
    `--resume-adapter-file`; returns (save(step), what a save writes)."""
    num_layers = args.num_layers if args.num_layers is not None else min(DEFAULT_NUM_LAYERS, len(model.layers))
    out = Path(args.adapter_path)
    if args.fine_tune_type == "full":
        check_full_fine_tunable(model)
        if args.train:
            check_save_path(out)  # before training: never replace a folder that is not a model
        enable_full(model, num_layers)
        if args.resume_adapter_file:
            load_full_weights(model, args.resume_adapter_file)
        return (lambda step: save_full_model(out, model)), "the fine-tuned model"
    config = enable_lora(model, args.rank, tuple(args.lora_keys), num_layers, scale=args.scale,
                         dropout=args.dropout, dora=args.fine_tune_type == "dora")
    if args.resume_adapter_file:
        load_adapter_weights(model, args.resume_adapter_file)
    return (lambda step: save_adapters(out, model, config)), "adapters"


def run(args: argparse.Namespace) -> dict:
    """Train and/or test as `args` says; returns {"history": [...], "test_loss": ...}."""
    if not (args.train or args.test):
        raise TrainingError("nothing to do: pass --train and/or --test")
    rank0 = mx.distributed.init().rank() == 0  # data parallel (mlx.launch): rank 0 reports and saves
    mx.random.seed(args.seed)  # the same adapter initialisation on every rank
    model, tokenizer = load(args.model)
    splits = (("train", "valid") if args.train else ()) + (("test",) if args.test else ())
    images = training_images(model)  # PaliGemma: image examples; Gemma 3 VLM etc.: a TrainingError
    data = load_datasets(args.data, tokenizer, splits, args.mask_prompt, args.max_seq_length, images)
    for split in splits:
        if split != "valid" and split not in data:
            raise TrainingError(f"{args.data}: no {split}.jsonl")
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    save, saved = _prepare_model(model, args)
    result: dict = {"history": []}
    if args.train:
        schedule = trainer.build_schedule(args.learning_rate, args.iters, args.lr_schedule, args.warmup, args.min_lr)
        optimizer = trainer.build_optimizer(args.optimizer, schedule, args.weight_decay, args.optimizer_state_dtype)
        targs = trainer.TrainingArgs(
            batch_size=args.batch_size, iters=args.iters, val_batches=args.val_batches,
            steps_per_report=args.steps_per_report, steps_per_eval=args.steps_per_eval, save_every=args.save_every,
            adapter_path=args.adapter_path, grad_accumulation_steps=args.grad_accumulation_steps,
            grad_checkpoint=args.grad_checkpoint, loss_chunk_size=args.loss_chunk_size, seed=args.seed)
        progress = Progress("train", args.iters, " steps") if sys.stderr.isatty() and rank0 else None
        result["history"] = trainer.train(
            model, optimizer, data["train"], data.get("valid"), targs, pad_id=pad_id, report=_printer(progress, not rank0),
            save=save)
        if progress is not None:
            progress.close(f"{saved} saved to {args.adapter_path}")
        elif rank0:
            print(f"Saved {saved} to {args.adapter_path}", flush=True)
    if args.test:
        loss = trainer.evaluate(model, data["test"], args.batch_size, args.test_batches, pad_id, args.loss_chunk_size)
        result["test_loss"] = loss
        if rank0:
            print(f"Test loss {loss:.3f}, test ppl {math.exp(loss):.3f}", flush=True)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(lambda: run(settings(argv)), "what was saved so far is intact")


if __name__ == "__main__":
    sys.exit(main())
