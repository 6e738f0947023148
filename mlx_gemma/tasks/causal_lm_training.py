"""keras-hub's fine-tuning interface on mlx_gemma's LoRA and training loop.

    lm = GemmaCausalLM.from_preset("gemma2_2b_en")
    lm.backbone.enable_lora(rank=4)          # query and value projections, as keras-hub
    lm.compile(optimizer="adamw", learning_rate=5e-5)
    lm.fit(x=["text one", "text two"], batch_size=2, epochs=1)
    lm.backbone.save_lora_weights("my_lora")  # a folder in mlx-lm's adapter layout

`fit` also takes preprocessed data, keras-hub style:
`fit(x={"token_ids", "padding_mask"}, y=next_ids, sample_weight=weights)`,
and keras' `epochs`, `shuffle` and `validation_data`; `evaluate` gives the loss.
The loss is the sample-weighted mean next-token cross-entropy (keras'
"sum_over_batch_size" divides by all positions instead; the gradient
direction is the same).  No work is spent on padding (causal_lm_data.py): a
batch is cut to its longest row, and shuffled rows are bucketed by length.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

from ..tuner import lora, trainer
from ..tuner.datasets import PAD_TO
from ..arguments import integer_arg, is_integer
from ..errors import AdapterError, MlxGemmaError, TrainingError
from ..progress import format_rate
from . import causal_lm_data

# keras-hub's Gemma layer names -> ours (`default_lora_layer_names` are query_dense/value_dense/query/value).
KERAS_NAMES = {"query": "q_proj", "query_dense": "q_proj", "key": "k_proj", "value": "v_proj",
               "value_dense": "v_proj", "attention_output": "o_proj", "ffw_gating": "gate_proj",
               "ffw_gating_2": "up_proj", "ffw_linear": "down_proj"}
DEFAULT_LEARNING_RATE = 2e-5  # keras-hub CausalLM.compile's default: Adam(2e-5)


class History:
    """What keras' `fit` returns: `history["loss"]` (and, with validation_data, `"val_loss"`) per epoch."""

    def __init__(self, validation: bool = False):
        self.history: dict[str, list[float]] = {"loss": [], **({"val_loss": []} if validation else {})}
        self.epoch: list[int] = []


def enable_lora(backbone, rank: int, target_layer_names=None, **settings) -> dict:
    """Freeze the backbone and add rank-`rank` adapters, keras-hub style (scale alpha / rank = 1)."""
    names = target_layer_names or ("query", "value")
    if isinstance(names, str):
        names = (names,)
    targets = tuple(dict.fromkeys(KERAS_NAMES.get(n, n) for n in names))
    settings.setdefault("alpha", rank)  # keras' EinsumDense.enable_lora: lora_alpha defaults to the rank
    backbone.lora_config = lora.enable_lora(backbone.model, rank, targets, **settings)
    return backbone.lora_config


def save_lora_weights(backbone, path) -> None:
    config = getattr(backbone, "lora_config", None)
    if config is None:
        raise MlxGemmaError("there are no LoRA layers in this model; call backbone.enable_lora(rank) first")
    lora.save_adapters(path, backbone.model, config)


def load_lora_weights(backbone, path) -> None:
    """Load adapters saved by `save_lora_weights` (or mlx-lm); enables LoRA first if needed."""
    config = lora.read_adapter_config(path)
    current = getattr(backbone, "lora_config", None)
    if current is None:
        lora.load_adapters(backbone.model, path)
        backbone.lora_config = config
        return
    for key in ("rank", "keys"):
        if config["lora_parameters"].get(key) != current["lora_parameters"][key]:
            raise AdapterError(path, f"LoRA {key} {config['lora_parameters'].get(key)!r} differs from this model's "
                               f"enable_lora setting {current['lora_parameters'][key]!r}")
    lora.load_adapter_weights(backbone.model, path)


def _optimizer(lm):
    settings = dict(getattr(lm, "training_settings", {}) or {})
    optimizer = settings.get("optimizer", "auto")
    if isinstance(optimizer, str):
        name = "adam" if optimizer == "auto" else optimizer
        optimizer = trainer.build_optimizer(name, settings.get("learning_rate", DEFAULT_LEARNING_RATE),
                                          settings.get("weight_decay", 0.0))
    return optimizer


def _check_settings(batch_size, epochs, shuffle, verbose) -> None:
    integer_arg("batch_size", batch_size, 1, error=TrainingError)
    integer_arg("epochs", epochs, 1, error=TrainingError)
    if not isinstance(shuffle, (bool, np.bool_)):
        raise TrainingError(f"shuffle must be True or False, got {shuffle!r:.80}")
    if not (verbose == "auto" if isinstance(verbose, str) else is_integer(verbose) and 0 <= verbose <= 2):
        raise TrainingError(f"verbose must be 'auto', 0, 1 or 2, got {verbose!r:.80}")


def _batches(data: causal_lm_data.LossData, batch_size: int, seed: int, shuffle: bool):
    """Training batches forever, epoch after epoch, each cut to the columns its rows need.

    Shuffled: bucketed by length (reshuffled each epoch); else in the data's order.
    Widths are rounded up to `PAD_TO` so the compiled step meets few shapes (as the LoRA CLI's).
    """
    rng = np.random.default_rng(seed)
    while True:
        for rows in causal_lm_data.row_batches(data.lengths, batch_size, rng if shuffle else None):
            yield causal_lm_data.batch(data, rows, PAD_TO)


def fit(lm, x=None, y=None, batch_size: int = 2, epochs: int = 1, sample_weight=None, *, validation_data=None,
        shuffle: bool = True, verbose="auto", seed: int = 0, grad_checkpoint: bool = False) -> History:
    """Train the backbone's trainable weights (its adapters after enable_lora); keras' fit arguments.

    Each epoch's loss is the mean of its batches' losses (each the sample-weighted mean
    next-token cross-entropy); `val_loss` is `evaluate` on validation_data after each epoch.
    """
    _check_settings(batch_size, epochs, shuffle, verbose)
    data = causal_lm_data.loss_data(lm, x, y, sample_weight)
    if len(data.ids) == 0 or not data.weights.any():
        raise TrainingError("fit() got no training tokens (empty data, or every sample weight is 0)")
    validation = causal_lm_data.validation_data(lm, validation_data)
    steps = math.ceil(len(data.ids) / batch_size)
    history = History(validation is not None)
    model = lm.backbone.model

    def report(info):
        if "train_loss" not in info:
            return
        history.history["loss"].append(info["train_loss"])
        history.epoch.append(len(history.epoch))
        line = f"Epoch {len(history.epoch)}/{epochs}: loss {info['train_loss']:.4f}"
        if validation is not None:
            history.history["val_loss"].append(evaluate_data(model, validation, batch_size))
            line += f", val_loss {history.history['val_loss'][-1]:.4f}"
        if verbose:
            print(f"{line}, {format_rate(info['tokens_per_second'])} tok/s, "
                  f"peak mem {info['peak_memory_gb']:.2f} GB", flush=True)

    args = trainer.TrainingArgs(batch_size=batch_size, iters=epochs * steps, steps_per_report=steps,
                              save_every=epochs * steps + 1, grad_checkpoint=grad_checkpoint, seed=seed)
    try:
        trainer.train(model, _optimizer(lm), None, args=args, report=report,
                      batches=_batches(data, batch_size, seed, shuffle))
    finally:
        model.eval()
    return history


def evaluate_data(model, data: causal_lm_data.LossData, batch_size: int) -> float:
    """The sample-weighted mean next-token cross-entropy over all of `data`, without gradients."""
    was_training = model.training
    model.eval()  # no adapter dropout
    total, count = mx.array(0.0), mx.array(0.0)
    try:
        # Sorted by length (the sum does not care about the order): batches carry little padding.
        for rows in causal_lm_data.row_batches(data.lengths, batch_size, by_length=True):
            if data.lengths[rows].max() == 0:
                continue  # nothing weighted in these rows
            loss, n = trainer.loss_fn(model, *causal_lm_data.batch(data, rows), differentiable=False)
            total, count = total + loss * n, count + n
            mx.eval(total, count)
    finally:
        model.train(was_training)
    return (total / count).item()


def evaluate(lm, x=None, y=None, batch_size: int | None = None, sample_weight=None, verbose="auto") -> float:
    """keras' evaluate: the loss (sample-weighted mean next-token cross-entropy) over x, as fit's.

    `batch_size` None: 32, keras' default.  Nothing is printed (verbose is accepted for keras' sake).
    """
    batch_size = 32 if batch_size is None else batch_size
    _check_settings(batch_size, 1, True, verbose)
    data = causal_lm_data.loss_data(lm, x, y, sample_weight)
    if not data.weights.any():
        raise TrainingError("evaluate() got no weighted target (empty data, or every sample weight is 0)")
    return evaluate_data(lm.backbone.model, data, batch_size)
