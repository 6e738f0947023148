"""The data of `GemmaCausalLM.fit` / `evaluate` / `predict`: arrays from strings or token-id
dicts, batches bucketed by length, and each batch cut to its own longest row.

keras-hub pads every row to the preprocessor's `sequence_length` because XLA needs
static shapes; MLX does not, so a batch's trailing columns that no row needs are
dropped before the forward pass.  For the loss that is exact: padding targets weigh
0, and with right padding, causal attention keeps every later column out of every
position the loss reads.
"""

from __future__ import annotations

from typing import NamedTuple

import mlx.core as mx
import numpy as np

from ..errors import TrainingError
from .preprocessor import as_texts


class LossData(NamedTuple):
    """Next-token training (or validation) data, right-padded: [N, T] arrays and [N] row lengths."""

    ids: np.ndarray  # int32 inputs
    targets: np.ndarray  # int32 next-token ids
    weights: np.ndarray  # float32 loss weights, 0 at padding
    lengths: np.ndarray  # columns a row needs: up to its last weighted target


def loss_data(lm, x, y=None, sample_weight=None, name: str = "x") -> LossData:
    """Strings (through the preprocessor) or {"token_ids", "padding_mask"} with y (and sample_weight).

    `name` is the argument the data came in (x, validation_data), for errors.
    """
    if isinstance(x, dict):
        return _from_token_ids(x, y, sample_weight, name)
    if lm.preprocessor is None:
        raise TrainingError(f"{name}: strings need a preprocessor; without one pass "
                            "{'token_ids', 'padding_mask'} with y")
    try:
        as_texts(x)
    except ValueError:
        raise TrainingError(f"{name} must be a string, a list of strings or a dict of 'token_ids' and "
                            f"'padding_mask', got {type(x).__name__}") from None
    if y is not None or sample_weight is not None:
        raise TrainingError(f"{name}: with a preprocessor, strings go in alone (it makes y and sample_weight "
                            "itself, the next tokens)")
    inputs, targets, weights = lm.preprocessor(x)
    ids = np.asarray(inputs["token_ids"])
    if ids.ndim == 1:
        ids, targets, weights = ids[None], np.asarray(targets)[None], np.asarray(weights)[None]
    return _with_lengths(ids.astype(np.int32), np.asarray(targets, np.int32), np.asarray(weights, np.float32))


def _from_token_ids(x: dict, y, sample_weight, name: str) -> LossData:
    if "token_ids" not in x:
        raise TrainingError(f"{name}: a dict needs 'token_ids' (and 'padding_mask')")
    if y is None:
        raise TrainingError(f"{name}: {{'token_ids', ...}} without a preprocessor needs y (the next-token ids)")
    ids = np.asarray(x["token_ids"])
    mask = np.asarray(x.get("padding_mask", np.ones(ids.shape, bool))).astype(bool)
    weights = np.ones(ids.shape, np.float32) if sample_weight is None else np.asarray(sample_weight, np.float32)
    y = np.asarray(y)
    if ids.ndim != 2 or y.shape != ids.shape or weights.shape != ids.shape or mask.shape != ids.shape:
        raise TrainingError(f"{name}: token_ids {ids.shape}, padding_mask {mask.shape}, y {y.shape} and "
                            f"sample_weight {weights.shape} must all be [batch, tokens]")
    # Training runs without an attention mask: padding must trail the tokens so no token sees it.
    if (mask[:, 1:] & ~mask[:, :-1]).any():
        raise TrainingError(f"{name}: takes right-padded rows (padding_mask 1...1 0...0); left padding "
                            "is not supported")
    return _with_lengths(ids.astype(np.int32), y.astype(np.int32), weights * mask)


def _with_lengths(ids, targets, weights) -> LossData:
    # A column after a row's last weighted target changes nothing the loss reads (causal attention).
    weighted = weights != 0
    lengths = np.where(weighted.any(axis=1), weights.shape[1] - np.argmax(weighted[:, ::-1], axis=1), 0)
    return LossData(ids, targets, weights, lengths)


def validation_data(lm, data) -> LossData | None:
    """keras' validation_data: strings, a token-id dict (with y), or a tuple (x, y[, sample_weight])."""
    if data is None:
        return None
    if isinstance(data, tuple) and not all(isinstance(t, str) for t in data):
        if not 1 <= len(data) <= 3:
            raise TrainingError(f"validation_data as a tuple is (x,), (x, y) or (x, y, sample_weight), got "
                                f"{len(data)} items")
        x, y, weights = (*data, None, None)[:3]
    else:
        x, y, weights = data, None, None
    found = loss_data(lm, x, y, weights, name="validation_data")
    if not found.weights.any():
        raise TrainingError("validation_data holds no weighted target (empty, or every sample weight is 0)")
    return found


def row_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator | None = None,
                by_length: bool = False) -> list[np.ndarray]:
    """Row indices of each batch: in order, or (`rng`) bucketed by length in a random order.

    Bucketed: rows sorted by length (equal lengths in random order) make the
    batches, so each carries little padding, and the batches are shuffled.
    `by_length` without `rng`: sorted, for work whose order does not matter.
    """
    if rng is not None:
        order = rng.permutation(len(lengths))
        order = order[np.argsort(lengths[order], kind="stable")]
    else:
        order = np.argsort(lengths, kind="stable") if by_length else np.arange(len(lengths))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    return [batches[b] for b in rng.permutation(len(batches))] if rng is not None else batches


def width(lengths: np.ndarray, limit: int, quantum: int = 1) -> int:
    """Columns a batch needs: its longest row, rounded up to `quantum`, at most `limit`, at least 1."""
    longest = int(lengths.max()) if len(lengths) else 0
    return max(1, min(limit, -(-longest // quantum) * quantum))


def batch(data: LossData, rows: np.ndarray, quantum: int = 1) -> tuple[mx.array, mx.array, mx.array]:
    """(inputs, targets, weights) of `rows`, cut to the columns they need."""
    w = width(data.lengths[rows], data.ids.shape[1], quantum)
    return mx.array(data.ids[rows, :w]), mx.array(data.targets[rows, :w]), mx.array(data.weights[rows, :w])
