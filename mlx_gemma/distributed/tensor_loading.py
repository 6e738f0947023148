"""Loading one tensor-parallel rank's share: the split checked before loading, then the model cut in place.

tensor_parallel.py decides what a rank keeps (attention heads, MLP widths, experts) and cuts a loaded
model; here the ranks first agree that they load the same model (sharded_loading's digest check), the
split is checked against the config before any weight is read, and the weights are loaded lazily, so
a rank evaluates only the slices it keeps.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .. import loading
from ..models.base import RankShare
from ..tokenizer import GemmaTokenizer, check_vocab_fits
from .sharded_loading import check_same_model, tensor_sizes
from .tensor_parallel import check_tensor_parallel, shard_tensor_parallel


def load_tensor_parallel(path_or_repo, group, *, dtype: mx.Dtype | None = None, revision: str | None = None):
    """(model, tokenizer) of this rank's tensor-parallel share of a folder or hub id."""
    folder = loading.resolve_model_path(path_or_repo, revision)
    config = loading.load_config(folder)
    check_tensor_parallel(config, group.size(), folder / "config.json")
    check_same_model(folder / "config.json", tensor_sizes(folder), group)
    model = loading.load_model(folder, dtype=dtype, lazy=True)
    shard_tensor_parallel(model, group)
    mx.eval(model.parameters())
    # every rank holds a slice of the same layers, so its own quantization is every rank's
    quantized = any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules())
    model.share = RankShare("tensor", group.rank(), group.size(), quantized)
    tokenizer = GemmaTokenizer.from_folder(folder)
    check_vocab_fits(tokenizer, model.args.vocab_size, tokenizer.path or folder)
    return model, tokenizer
