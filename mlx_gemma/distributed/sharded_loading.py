"""Loading one pipeline rank's share: the split by bytes, the shards to open (or download), the checks.

Before anything is loaded every rank reads the config and the weights' names and sizes (the
safetensors headers, or the hub's header metadata), checks that all ranks see the same model
(an all_gather of a digest of config.json and the weight index), and computes the same split:
contiguous layer ranges whose bytes (each layer's tensors as stored, quantized or not, and its
share of Gemma 4's per-layer table and projection, plus what the first and last ranks hold
besides: embeddings, towers, final norm, head) are as even as the allowed cut points permit.
A cut never separates a Gemma 4 KV-shared layer from the earlier layer whose keys and values it
reads, nor a quantized per-layer table's packed columns (`allowed_cuts`).  Then a rank opens only
the shards holding its tensors (with a hub id it downloads only those), reads only its layers'
part of the per-layer table and projection (per_layer_split.py), and the model is built, cut
(pipeline.py) and loaded strictly through loading.py.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from .. import loading
from ..errors import DistributedError, WeightsMismatchError
from ..model_folder import load_weights_from_folder, weight_files
from ..models import DRAFTERS
from ..tensorfile import INDEX_NAME, read_header
from ..tokenizer import GemmaTokenizer, check_vocab_fits
from .per_layer_split import TABLE, is_split, layers_per_cut, read_part, slice_range
from .pipeline import PipelineModel, pipeline
from .watchdog import watch

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_TOWER = re.compile(r"(?:^|\.)(vision_tower|audio_tower|embed_vision|embed_audio|multi_modal_projector)\.")
# What a rank fetches from the hub besides weights: configs and the tokenizer (loading.HUB_ALLOW_PATTERNS less
# the safetensors).
HUB_SIDE_FILES = [p for p in loading.HUB_ALLOW_PATTERNS if not p.endswith(".safetensors")]
_DTYPES = (mx.float32, mx.float16, mx.bfloat16)  # the activation / logits dtypes the ranks agree on


def tensor_role(name: str) -> tuple[str, int | None]:
    """What a checkpoint tensor is, in any layout: ("layer", i), or (role, None) for the others:
    "tower", "head", "embed", "per_layer" (Gemma 4's per-layer table and projection: each rank its
    layers' part), "per_layer_norm" (every rank's), "other" (the final norm: the last rank's)."""
    if _TOWER.search(name):
        return "tower", None
    m = _LAYER.search(name)
    if m:
        return "layer", int(m.group(1))
    if "lm_head" in name:
        return "head", None
    if "per_layer" in name:  # Gemma 4's per-layer embedding table, its projection and norm
        return ("per_layer" if is_split(name) else "per_layer_norm"), None
    if "embed_tokens" in name:
        return "embed", None
    return "other", None  # the final norm


def wanted_by(rank: int, size: int, start: int, end: int, tied: bool):
    """Predicate on checkpoint tensor names: does this rank load it?"""
    first, last = rank == 0, rank == size - 1

    def wanted(name: str) -> bool:
        role, i = tensor_role(name)
        if role == "layer":
            return start <= i < end
        return {"tower": first, "per_layer": True, "per_layer_norm": True, "head": last,
                "embed": first or (last and tied), "other": last}[role]
    return wanted


def allowed_cuts(text_args, table_widths: list[int] = ()) -> list[int]:
    """Where a new rank may start (layer indices 1..L-1): never between a Gemma 4 KV-shared
    layer and the layer whose keys and values it reads, which we keep on one rank rather than send;
    and, for a quantized per-layer table whose leaves have `table_widths` stored columns, only where
    its quantization groups and packed words stay whole (per_layer_split.layers_per_cut)."""
    L = text_args.num_hidden_layers
    sources = text_args.kv_sources() if hasattr(text_args, "kv_sources") else [None] * L
    banned = {c for j, s in enumerate(sources) if s is not None for c in range(s + 1, j + 1)}
    step = layers_per_cut(list(table_widths), L)
    return [c for c in range(1, L) if c not in banned and c % step == 0]


def plan_split(layer_bytes: list[int], first_bytes: int, last_bytes: int, size: int, cuts: list[int]) -> list[int]:
    """Each rank's first layer: contiguous ranges minimising the largest rank's bytes (its layers,
    plus `first_bytes` on rank 0 and `last_bytes` on the last), cut only at `cuts`."""
    L = len(layer_bytes)
    if size == 1:
        return [0]
    if size - 1 > len(cuts):
        raise DistributedError(f"{size} pipeline ranks cannot split a model of {L} layers: it has {len(cuts) + 1} "
                               f"possible stages (Gemma 4's KV-shared layers stay with the layers they read); "
                               f"use at most {len(cuts) + 1} ranks")
    points = [0, *cuts, L]
    prefix = [0]
    for b in layer_bytes:
        prefix.append(prefix[-1] + b)

    def cost(r: int, a: int, b: int) -> int:
        return prefix[b] - prefix[a] + (first_bytes if r == 0 else 0) + (last_bytes if r == size - 1 else 0)

    # best[r][k]: the smallest largest load of ranks 0..r covering layers 0..points[k]-1, rank r ending there
    inf = float("inf")
    best = [[inf] * len(points) for _ in range(size)]
    back = [[0] * len(points) for _ in range(size)]
    for k in range(1, len(points)):
        best[0][k] = cost(0, 0, points[k])
    for r in range(1, size):
        for k in range(r + 1, len(points)):
            for j in range(r, k):
                v = max(best[r - 1][j], cost(r, points[j], points[k]))
                if v < best[r][k]:
                    best[r][k], back[r][k] = v, j
    starts, k = [], len(points) - 1
    for r in range(size - 1, 0, -1):
        k = back[r][k]
        starts.append(points[k])
    return [0, *reversed(starts)]


def tensor_sizes(folder: Path) -> dict[str, tuple[str, int]]:
    """Tensor name -> (file name, bytes as stored), from the headers (no data read)."""
    files = weight_files(folder)
    headers = {path: read_header(path) for path in set(files.values())}
    return {name: (path.name, headers[path].tensors[name].nbytes) for name, path in files.items()}


def _hub_sizes(repo_id: str, revision: str | None) -> tuple[dict[str, tuple[str, int]], dict[str, list[int]]]:
    """As `tensor_sizes` (and the per-layer table's shapes), for a hub repo: its safetensors headers,
    read without downloading the weights."""
    # deferred: huggingface_hub is a heavy import, needed only for a hub id
    from huggingface_hub import get_safetensors_metadata

    meta = get_safetensors_metadata(repo_id, revision=revision)
    infos = {name: (file, info) for file, fm in meta.files_metadata.items() for name, info in fm.tensors.items()}
    sizes = {name: (file, info.data_offsets[1] - info.data_offsets[0]) for name, (file, info) in infos.items()}
    return sizes, {name: list(info.shape) for name, (_, info) in infos.items() if TABLE in name}


def _table_widths(folder: Path, sizes: dict[str, tuple[str, int]], shapes: dict[str, list[int]] | None) -> list[int]:
    """The stored last-axis widths of Gemma 4's per-layer table leaves (weight, and scales / biases when
    quantized), from the hub's metadata or the local files' headers (no data read)."""
    names = [name for name in sizes if TABLE in name]
    if shapes is not None:
        return [shapes[name][-1] for name in names]
    return [read_header(folder / sizes[name][0]).tensors[name].shape[-1] for name in names]


def _hub_download(repo_id: str, revision: str | None, patterns: list[str]) -> Path:
    # deferred: huggingface_hub is a heavy import, needed only for a hub id
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as e:  # offline, missing cache entry, HTTP errors: one typed error naming the repo
        raise DistributedError(f"{repo_id}: could not fetch {', '.join(patterns[:4])} from the Hugging Face hub: "
                               f"{e}") from e


def _digest(config_path: Path, sizes: dict[str, tuple[str, int]]) -> list[int]:
    """Two 31-bit words of a SHA-256 over config.json and the weights' names, files and sizes."""
    h = hashlib.sha256(config_path.read_bytes())
    h.update(json.dumps(sorted((k, *v) for k, v in sizes.items())).encode())
    d = int.from_bytes(h.digest()[:8], "little")
    return [d & 0x7FFFFFFF, (d >> 31) & 0x7FFFFFFF]


def gather_ints(values: list[int], group) -> list[list[int]]:
    """Every rank's `values` (same length on every rank), in rank order."""
    out = mx.distributed.all_gather(mx.array(values, dtype=mx.int32), group=group, stream=mx.cpu)
    flat = out.tolist()
    n = len(values)
    return [flat[r * n:(r + 1) * n] for r in range(group.size())]


def check_same_model(config_path: Path, sizes, group) -> None:
    with watch("checking that every rank loads the same model"):
        words = gather_ints(_digest(config_path, sizes), group)
    if any(w != words[0] for w in words):
        groups: dict[tuple, list[int]] = {}
        for r, w in enumerate(words):
            groups.setdefault(tuple(w), []).append(r)
        raise DistributedError(f"rank {group.rank()}: the ranks load different models (config.json or weights "
                               f"differ: ranks {' vs '.join(str(v) for v in groups.values())}); give every rank "
                               "the same model folder")


def split_for(config: dict, sizes: dict[str, tuple[str, int]], size: int, config_path=None,
              table_widths: list[int] = ()) -> tuple[list[int], bool]:
    """(each rank's first layer, tied head) for a config and its tensors' sizes (and the stored widths
    of a quantized per-layer table's leaves): DistributedError if it cannot be split."""
    args = loading.model_args(config, config_path)
    text = args.text if hasattr(args, "text") else args
    tied = bool(args.tie_word_embeddings)
    L = text.num_hidden_layers
    layer_bytes, first, last = rank_bytes(sizes, L, tied)
    return plan_split(layer_bytes, first, last, size, allowed_cuts(text, table_widths)), tied


def rank_bytes(sizes: dict[str, tuple[str, int]], layers: int, tied: bool) -> tuple[list[int], int, int]:
    """(bytes per layer, with its share of the per-layer table and projection; bytes only the first
    rank adds; bytes only the last adds): what plan_split balances."""
    layer_bytes, first, last = [0] * layers, 0, 0
    for name, (_, nbytes) in sizes.items():
        role, i = tensor_role(name)
        if role == "layer":
            if i < layers:
                layer_bytes[i] += nbytes
        elif role == "per_layer":  # each layer's P columns (rows) of it
            layer_bytes = [b + nbytes // layers for b in layer_bytes]
        else:
            first += nbytes if role in ("tower", "per_layer_norm", "embed") else 0
            last += nbytes if role in ("head", "per_layer_norm", "other") or (role == "embed" and tied) else 0
    return layer_bytes, first, last


def load_pipeline(path_or_repo, group, *, dtype: mx.Dtype | None = None, revision: str | None = None):
    """(model, tokenizer) of this rank's share of a folder or hub id (see the module's docstring)."""
    rank, size = group.rank(), group.size()
    local = Path(path_or_repo).expanduser()
    hub = not local.exists() and isinstance(path_or_repo, str) and loading._REPO_ID.match(path_or_repo)
    shapes = None  # the per-layer table's shapes, from the hub's metadata (else from the files' headers)
    if hub:
        folder = _hub_download(path_or_repo, revision, HUB_SIDE_FILES)
        if not (folder / INDEX_NAME).exists() and any(folder.glob("*.safetensors")):
            sizes = tensor_sizes(folder)
        else:
            sizes, shapes = _hub_sizes(path_or_repo, revision)
    else:
        folder = loading.resolve_model_path(path_or_repo, revision)
        sizes = tensor_sizes(folder)
    config_path = folder / "config.json"
    config = loading.load_config(folder)
    if loading.is_encoder_config(config) or config.get("model_type") in DRAFTERS:
        raise DistributedError(f"{config_path}: a pipeline runs causal language models; this is "
                               f"{'a sentence encoder' if loading.is_encoder_config(config) else 'a draft model'}")
    check_same_model(config_path, sizes, group)
    starts, tied = split_for(config, sizes, size, config_path, _table_widths(folder, sizes, shapes))
    start = starts[rank]
    L = _num_layers(config, config_path)
    end = starts[rank + 1] if rank + 1 < size else L
    wanted = wanted_by(rank, size, start, end, tied)
    if hub:
        files = sorted({file for name, (file, _) in sizes.items() if wanted(name)})
        folder = _hub_download(path_or_repo, revision, HUB_SIDE_FILES + files)
    raw = {k: v for k, v in load_weights_from_folder(folder, wanted).items() if wanted(k)}
    for name in [k for k in raw if is_split(k)]:  # the lazily loaded whole tensor is dropped unread
        axis, first, stop = slice_range(name, raw[name].shape, L, start, end)
        raw[name] = read_part(folder / sizes[name][0], name, axis, first, stop)
    stages = []

    def shard(model, weights):
        unexpected = sorted(weights.keys() - _names(model))
        if unexpected:
            raise WeightsMismatchError(folder, f"weights do not fit the config; unexpected: {', '.join(unexpected[:8])}")
        stages.append(pipeline(model, group, start, end))
        keep = _names(model)
        return {k: v for k, v in weights.items() if k in keep}

    inner = loading.load_model_from(config, raw, path=folder, dtype=dtype, shard=shard)
    inner.path = folder
    model = PipelineModel(inner, stages[0])
    mx.eval(model.parameters())
    _agree_dtypes(model, group)
    tokenizer = GemmaTokenizer.from_folder(folder)
    check_vocab_fits(tokenizer, model.args.vocab_size, tokenizer.path or folder)
    return model, tokenizer


def _names(model) -> set[str]:
    """The model's parameter names, and beside each weight the scales and biases a quantized
    checkpoint brings (quantize_like makes those layers quantized after the cut)."""
    names = {k for k, _ in tree_flatten(model.parameters())}
    return names | {k[: -len("weight")] + part for k in names if k.endswith(".weight") for part in ("scales", "biases")}


def _num_layers(config: dict, config_path) -> int:
    args = loading.model_args(config, config_path)
    return (args.text if hasattr(args, "text") else args).num_hidden_layers


def _agree_dtypes(model: PipelineModel, group) -> None:
    """The activations' dtype (rank 0's embeddings) and the logits' (the last rank's head), on every rank."""
    stage = model.stage
    probe = mx.zeros((1, 1), mx.int32)
    act = _DTYPES.index(stage.embed(probe).dtype) if stage.first else 0
    words = gather_ints([act], group)
    stage.dtype = _DTYPES[words[0][0]]
    logits = 0
    if stage.last:  # lazily: only the dtype is read, nothing is computed
        logits = _DTYPES.index(model._inner.logits(mx.zeros((1, model.args.hidden_size), stage.dtype)).dtype)
    words = gather_ints([logits], group)
    model.logits_dtype = _DTYPES[words[-1][0]]


def pipeline_bytes(model) -> int:
    """The bytes of the parameters this rank holds."""
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))

