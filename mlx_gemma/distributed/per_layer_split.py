"""Gemma 4's per-layer embeddings (E2B / E4B) split across pipeline ranks by layers, read from disk by slices.

The per-layer table `embed_tokens_per_layer` [V, L*P] packs every layer's P columns side by side, and
`per_layer_model_projection` [L*P, hidden] maps the scaled token embedding to every layer's P inputs
(its rows, in the same order).  Layer i's inputs read only the table's columns and the projection's
rows [i*P, (i+1)*P), and `per_layer_projection_norm` normalizes each layer's P values on their own
(transformers 5.25, modeling_gemma4.py: get_per_layer_inputs reshapes the lookup to [.., L, P];
project_per_layer_inputs projects, reshapes to [.., L, P] and norms over P).  So a pipeline rank
holding layers start..end-1 keeps only those columns and rows, and computes its own layers' inputs
from the token ids and rank 0's embedded hidden state (pipeline.Stage).  In the real E2B the table
is [262144, 35*256], 4.7 GB in bf16: the model's largest tensor.

A quantized table is packed along its last axis (quantization groups, and 32 / bits values per
uint32 word), so a cut may fall only where every leaf's column count is whole: `layers_per_cut`.
The slices are read with a memory map of the safetensors file, so a rank reads (about) its pages
of the table and never the whole of it.  (With a hub id the file holding the table is downloaded
whole: the table is stored row-major, [vocab, layers x width], so a rank's columns lie in every one of
its 262,144 rows, spread over the whole tensor; ranged HTTP reads would fetch one short piece per row,
or nearly the whole tensor.  A rank still reads and holds only its part.)
"""

from __future__ import annotations

import math
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..errors import DistributedError
from ..tensorfile import read_header

TABLE = "embed_tokens_per_layer."  # [V, L*P]: split by columns (and its scales / biases, quantized)
PROJECTION = "per_layer_model_projection."  # [L*P, hidden]: split by rows
NORM = "per_layer_projection_norm."  # [P]: every rank's
# safetensors dtype -> the numpy dtype its bytes are read as (bf16 as its raw 16 bits, viewed as bf16 in MLX)
_NUMPY = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "U32": np.uint32, "U8": np.uint8,
          "I8": np.int8, "U16": np.uint16, "I32": np.int32}


def is_split(name: str) -> bool:
    """The table's and the projection's tensors (not the norm's): each rank keeps its layers' part."""
    return TABLE in name or PROJECTION in name


def layers_per_cut(table_widths: list[int], layers: int) -> int:
    """The cut points' step in layers: a cut after layer c splits a table leaf of `w` stored columns
    (w = L*P floats, L*P*bits/32 packed words, or L*P/group_size scales) at column c*w/L, which must be
    whole for every leaf.  1 for float tables and for real checkpoints (P = 256)."""
    step = 1
    for w in table_widths:
        step = math.lcm(step, layers // math.gcd(w, layers))
    return step


def slice_range(name: str, shape: tuple[int, ...], layers: int, start: int, end: int) -> tuple[int, int, int]:
    """(axis, first, stop) of layers start..end-1's part of a split tensor of `shape`."""
    axis = -1 if TABLE in name else 0
    width = shape[axis]
    if (start * width) % layers or (end * width) % layers:
        raise DistributedError(f"{name}: its {width} stored columns do not split into whole parts for layers "
                               f"{start}..{end - 1} of {layers} (a quantization group or packed word would be cut)")
    return axis, start * width // layers, end * width // layers


def read_part(path: Path, name: str, axis: int, first: int, stop: int) -> mx.array:
    """[first, stop) along `axis` (0 or -1) of tensor `name` of a safetensors file, read through a memory
    map: only those rows (a contiguous range) or those columns of every row are read."""
    header = read_header(path)
    info = header.tensors[name]
    if info.dtype not in _NUMPY or len(info.shape) != 2:
        raise DistributedError(f"{path}: tensor {name!r} is {info.dtype} {list(info.shape)}; a pipeline splits "
                               f"Gemma 4's per-layer table as a 2-D float or quantized tensor")
    mapped = np.memmap(path, dtype=_NUMPY[info.dtype], mode="r", offset=header.data_start + info.begin,
                       shape=info.shape)
    part = np.ascontiguousarray(mapped[first:stop] if axis == 0 else mapped[:, first:stop])
    del mapped
    out = mx.array(part)
    return out.view(mx.bfloat16) if info.dtype == "BF16" else out
