"""Run by tests/test_distributed_lora.py, once in one process and once under `mlx.launch -n 2 --backend ring`.

Trains LoRA adapters on tiny Gemma (fp32) for 10 steps of a global batch of 4 examples, with SGD (which
shows a gradient summed where it should be averaged, or the reverse) and with AdamW (the default).  Under
mlx.launch each rank takes its half of every batch (tuner.datasets.iterate_batches).  The examples differ
in length and in how much of them is prompt, so the two halves of a batch hold different numbers of
target tokens: the ranks' losses must be weighed by their tokens to give the whole batch's mean.
Rank r writes <out>/rank<r>.json: per optimizer, the training loss of every step and the final adapters.

usage: lora_parity.py OUT_DIR [SGD_RATE ADAMW_RATE]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from mlx_gemma.loading import load_model
from mlx_gemma.tuner import TrainingArgs, build_optimizer, enable_lora, train

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
STEPS, BATCH = 10, 4
# Rates where this tiny model trains stably.  At SGD 0.5 / AdamW 1e-2 its training is chaotic: one process
# and two ranks agreed to 1e-5 for 4 steps, then their rounding differences grew ~10x a step (measured).
SGD_RATE, ADAMW_RATE = (float(x) for x in sys.argv[2:4]) if len(sys.argv) > 3 else (0.1, 1e-3)


def examples() -> list[tuple[list[int], int]]:
    """16 (ids, offset) examples of 5 to 20 tokens; the first `offset` tokens are prompt (no loss)."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(16):
        length = int(rng.integers(5, 21))
        out.append(([2] + rng.integers(3, 512, length - 1).tolist(), int(rng.integers(1, length - 2))))
    return out


def run(optimizer: str, learning_rate: float) -> dict:
    model = load_model(FIXTURES / "tiny_gemma")
    mx.random.seed(1)  # the adapters' A matrices start alike in every process
    enable_lora(model, rank=4, target_names=("q_proj", "v_proj", "down_proj"), dropout=0.0)
    args = TrainingArgs(batch_size=BATCH, iters=STEPS, steps_per_report=1, steps_per_eval=10_000,
                        save_every=10_000, val_batches=0, seed=5)
    history = train(model, build_optimizer(optimizer, learning_rate), examples(), args=args)
    losses = [h["train_loss"] for h in history if "train_loss" in h]
    adapters = {k: np.array(v).tolist() for k, v in tree_flatten(model.trainable_parameters())}
    return {"losses": losses, "adapters": adapters}


def main() -> None:
    out = Path(sys.argv[1])
    group = mx.distributed.init()
    result = {"world": group.size(), "sgd": run("sgd", SGD_RATE), "adamw": run("adamw", ADAMW_RATE)}
    (out / f"rank{group.rank()}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
