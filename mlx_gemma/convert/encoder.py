"""Converting a sentence-transformers folder (EmbeddingGemma) into an MLX folder of the same layout.

The output keeps what `SentenceTransformer.save` writes, so both `mlx_gemma.load` and
sentence-transformers read it: the backbone in the root (`model.safetensors`, named as
Gemma3TextModel saves it, without the `model.` prefix; quantized with -q), `modules.json`,
`config_sentence_transformers.json`, `sentence_bert_config.json`, and each module's subfolder
(`1_Pooling/config.json`, `2_Dense/{config.json, model.safetensors}`, `4_Normalize/`), the
Dense weights float as `linear.weight` (see models/embedding_gemma.py for why).  A folder
mlx-embeddings wrote (the Dense layers as `dense.<i>.*` in the root file, no subfolders) is
written back in that layout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx

from ..embedding_folder import MAX_JSON_BYTES, is_mlx_embeddings_layout, read_modules
from ..json_input import read_json
from .hf import read_text_bytes

ST_FILES = ("modules.json", "config_sentence_transformers.json", "sentence_bert_config.json")


def encoder_files(folder: Path, weights: dict[str, Any], scratch: Path, source_names=()) -> tuple[dict, dict]:
    """(root weights, extra files) for the output: the Dense weights go to their module's
    subfolder (saved under `scratch` first, then copied by the writer), the rest stay in the root.
    A source in mlx-embeddings' layout (`source_names`: its root weight names) is written in it."""
    folder = Path(folder)
    extra: dict[str, bytes | Path] = {}
    for name in ST_FILES:
        if (folder / name).is_file():
            read_json(folder / name, MAX_JSON_BYTES)  # size-capped JSON, or an error naming the file
            extra[name] = read_text_bytes(folder / name, MAX_JSON_BYTES)
    if is_mlx_embeddings_layout(source_names):  # one root file, `dense.<i>.weight`; no module subfolders
        return {k.replace(".linear.", ".", 1) if k.startswith("dense.") else k: v for k, v in weights.items()}, extra
    dense = 0
    for kind, sub in read_modules(folder):
        if kind == "Transformer":
            continue
        rel = sub.relative_to(folder).as_posix()
        config = sub / "config.json"
        if config.is_file():
            read_json(config, MAX_JSON_BYTES)
            extra[f"{rel}/config.json"] = read_text_bytes(config, MAX_JSON_BYTES)
        if kind == "Dense":
            prefix = f"dense.{dense}."
            layer = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
            path = Path(scratch) / f"dense{dense}.safetensors"
            mx.save_safetensors(str(path), layer, metadata={"format": "pt"})
            extra[f"{rel}/model.safetensors"] = path
            dense += 1
    # Gemma3TextModel's own names, as sentence-transformers saves the backbone.
    root = {k.removeprefix("model."): v for k, v in weights.items() if not k.startswith("dense.")}
    return root, extra
