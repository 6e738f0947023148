"""What every checkpoint reader hands the converter: one `Checkpoint` type.

A leaf: the readers (`hf.py`, `gguf.py`, `keras.py`, `keras_paligemma.py`) build it,
the converter (`__init__.py`), `default_model.py` and `fuse.py` take it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx

# Float types by the name configs, keras-hub and our --dtype flag give them.
DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


@dataclass
class Checkpoint:
    """A checkpoint in Hugging Face terms, whatever format it was read from."""

    config: dict[str, Any]  # Hugging Face-style config.json
    weights: dict[str, Any]  # HF tensor name -> mx.array or numpy array (HF layout)
    tokenizer_model: bytes | Path | None  # tokenizer.model bytes or a file to copy
    generation_config: dict[str, Any] | None
    source: Path | None = None  # the folder or file read (never a destination)
    source_dtype: str | None = None  # how the source stored its floats, where the format says (Keras)
    metadata: dict[str, Any] = field(default_factory=dict)  # the format's own settings (GGUF scalars, Keras config)
    # Small files the output folder keeps as read (name -> validated bytes): tokenizer and
    # processor configs, chat templates (hf.py); the writer copies them beside the weights.
    extra_files: dict[str, bytes] = field(default_factory=dict)


def as_mx(weights: dict[str, Any]) -> dict[str, mx.array]:
    return {k: v if isinstance(v, mx.array) else mx.array(v) for k, v in weights.items()}


def generation_config(bos: int, eos: int, pad: int, *extra_stops: int | None) -> dict[str, Any]:
    """generation_config.json for readers that rebuild it: eos first, then any
    further stop ids (e.g. `<end_of_turn>`), without repeats."""
    eos_ids = [eos]
    for stop in extra_stops:
        if stop is not None and stop not in eos_ids:
            eos_ids.append(stop)
    return {"bos_token_id": bos, "eos_token_id": eos_ids, "pad_token_id": pad}
