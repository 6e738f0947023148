"""Fine-tuning: LoRA / QLoRA / DoRA adapters, the training loop, and the fine-tuning data.

Laid out as mlx-lm's `mlx_lm/tuner/`: `lora.py` (the adapter layers; enable, fuse, save and
load adapters in mlx-lm's folder layout), `losses.py` (the chunked loss, for a frozen or a
trainable output head), `optimizers.py` (Adam / AdamW updating in place, schedules),
`trainer.py` (gradient checkpointing, the data-parallel training loop), `datasets.py` (JSONL
examples -> padded batches).  The command lines sit above this room: `python -m mlx_gemma.lora` (train / test)
and `python -m mlx_gemma.fuse` (merge adapters into a model folder).
"""

from .datasets import iterate_batches, load_datasets, load_jsonl, make_batch
from .lora import (
    DoRALinear,
    LoRALinear,
    enable_lora,
    fuse,
    load_adapter_weights,
    load_adapters,
    lora_layers,
    read_adapter_config,
    save_adapters,
)
from .trainer import TrainingArgs, build_optimizer, build_schedule, evaluate, loss_fn, train

__all__ = ["LoRALinear", "DoRALinear", "enable_lora", "fuse", "lora_layers", "save_adapters", "load_adapters",
           "load_adapter_weights", "read_adapter_config", "TrainingArgs", "train", "evaluate", "loss_fn",
           "build_optimizer", "build_schedule", "load_datasets", "load_jsonl", "iterate_batches", "make_batch"]
