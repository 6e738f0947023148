"""keras-hub's fine-tuning interface on mlx_gemma's LoRA and training loop.

    lm = GemmaCausalLM.from_preset("gemma2_2b_en")
    lm.backbone.enable_lora(rank=4)          # query and value projections, as keras-hub
    lm.compile(optimizer="adamw", learning_rate=5e-5)
    lm.fit(x=["text one", "text two"], batch_size=2, epochs=1)
    lm.backbone.save_lora_weights("my_lora")  # a folder in mlx-lm's adapter layout

`fit` also takes preprocessed data, keras-hub style:
`fit(x={"token_ids", "padding_mask"}, y=next_ids, sample_weight=weights)`.
The loss is the sample-weighted mean next-token cross-entropy (keras'
"sum_over_batch_size" divides by all positions instead; the gradient
direction is the same).
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

from ..tuner import lora, trainer
from ..arguments import integer_arg
from ..errors import AdapterError, MlxGemmaError
from ..progress import format_rate

# keras-hub's Gemma layer names -> ours (`default_lora_layer_names` are query_dense/value_dense/query/value).
KERAS_NAMES = {"query": "q_proj", "query_dense": "q_proj", "key": "k_proj", "value": "v_proj",
               "value_dense": "v_proj", "attention_output": "o_proj", "ffw_gating": "gate_proj",
               "ffw_gating_2": "up_proj", "ffw_linear": "down_proj"}
DEFAULT_LEARNING_RATE = 2e-5  # keras-hub CausalLM.compile's default: Adam(2e-5)


class History:
    """What keras' `fit` returns: `history["loss"]` (and `"val_loss"`) per epoch."""

    def __init__(self):
        self.history: dict[str, list[float]] = {"loss": []}
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


def _training_arrays(lm, x, y, sample_weight):
    """(token_ids, targets, weights) numpy [N, T] from strings (via the preprocessor) or arrays."""
    if isinstance(x, dict):
        if "token_ids" not in x:
            raise MlxGemmaError("fit(x=dict) needs 'token_ids' (and 'padding_mask')")
        if y is None:
            raise MlxGemmaError("fit(x={'token_ids', ...}) without a preprocessor needs y (the next-token ids)")
        ids = np.asarray(x["token_ids"])
        mask = np.asarray(x.get("padding_mask", np.ones(ids.shape, bool))).astype(bool)
        weights = np.ones(ids.shape, np.float32) if sample_weight is None else np.asarray(sample_weight, np.float32)
        y = np.asarray(y)
        if ids.ndim != 2 or y.shape != ids.shape or weights.shape != ids.shape or mask.shape != ids.shape:
            raise MlxGemmaError(f"token_ids {ids.shape}, padding_mask {mask.shape}, y {y.shape} and sample_weight "
                                f"{weights.shape} must all be [batch, tokens]")
        # The loop runs without an attention mask: padding must trail the tokens so no token sees it.
        if (mask[:, 1:] & ~mask[:, :-1]).any():
            raise MlxGemmaError("fit() takes right-padded rows (padding_mask 1...1 0...0); left padding is not supported")
        return ids.astype(np.int32), y.astype(np.int32), weights * mask
    if lm.preprocessor is None:
        raise MlxGemmaError("fit() on strings needs a preprocessor; without one pass x={'token_ids', 'padding_mask'}, y")
    inputs, targets, weights = lm.preprocessor(x, y, sample_weight)
    ids = np.asarray(inputs["token_ids"])
    if ids.ndim == 1:
        ids, targets, weights = ids[None], np.asarray(targets)[None], np.asarray(weights)[None]
    return ids.astype(np.int32), np.asarray(targets, np.int32), np.asarray(weights, np.float32)


def _batches(ids, targets, weights, batch_size: int, seed: int, shuffle: bool):
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(ids)) if shuffle else np.arange(len(ids))
        for start in range(0, len(ids), batch_size):
            rows = order[start:start + batch_size]
            yield mx.array(ids[rows]), mx.array(targets[rows]), mx.array(weights[rows])


def fit(lm, x=None, y=None, batch_size: int = 2, epochs: int = 1, sample_weight=None, shuffle: bool = True,
        verbose="auto", seed: int = 0, grad_checkpoint: bool = False) -> History:
    """Train the backbone's trainable weights (its adapters after enable_lora); keras' fit arguments."""
    integer_arg("batch_size", batch_size, 1)
    integer_arg("epochs", epochs, 1)
    ids, targets, weights = _training_arrays(lm, x, y, sample_weight)
    if len(ids) == 0 or weights.sum() == 0:
        raise MlxGemmaError("fit() got no training tokens (empty data, or every sample weight is 0)")
    steps = math.ceil(len(ids) / batch_size)
    settings = dict(getattr(lm, "training_settings", {}) or {})
    optimizer = settings.get("optimizer", "auto")
    if isinstance(optimizer, str):
        name = "adam" if optimizer == "auto" else optimizer
        optimizer = trainer.build_optimizer(name, settings.get("learning_rate", DEFAULT_LEARNING_RATE),
                                          settings.get("weight_decay", 0.0))
    history = History()
    show = verbose not in (0, False)

    def report(info):
        if "train_loss" in info:
            history.history["loss"].append(info["train_loss"])
            history.epoch.append(len(history.epoch))
            if show:
                print(f"Epoch {len(history.epoch)}/{epochs}: loss {info['train_loss']:.4f}, "
                      f"{format_rate(info['tokens_per_second'])} tok/s, peak mem {info['peak_memory_gb']:.2f} GB", flush=True)

    args = trainer.TrainingArgs(batch_size=batch_size, iters=epochs * steps, steps_per_report=steps,
                              save_every=epochs * steps + 1, grad_checkpoint=grad_checkpoint, seed=seed)
    trainer.train(lm.backbone.model, optimizer, None, args=args, report=report,
                batches=_batches(ids, targets, weights, batch_size, seed, shuffle))
    lm.backbone.model.eval()
    return history
