"""keras-hub preset names -> Hugging Face repositories and architectures, and preset handles -> folders.

`PRESETS` lists keras-hub 0.32's Gemma / Gemma 2 presets (`keras_hub/src/models/
gemma/gemma_presets.py`), its text-only Gemma 3 ones and MedGemma (`gemma3/gemma3_presets.py`)
(`GEMMA4_PRESETS`: its Gemma 4 ones), each with the Hugging Face repository holding the same
checkpoint (from the presets' descriptions and the Hugging Face model cards), its
Kaggle handle, and its backbone's shape in keras-hub's argument names -- enough
to build random weights (`load_weights=False`) without downloading anything.
tests/test_tasks.py checks every shape against keras-hub's recorded parameter
counts.

`resolve_preset(handle)` turns what `from_preset` accepts into a local folder:

    "gemma2_instruct_2b_en"      a preset name: its Hugging Face repository
    "hf://google/gemma-2-2b-it"  a Hugging Face repository
    "kaggle://keras/gemma/..."   a Kaggle handle (needs `kagglehub`; else a typed
                                 error saying how to download it by hand)
    "path/to/folder"             an MLX / Hugging Face folder, or a keras-hub preset
                                 folder, converted once into the cache

Hub access goes through `mlx_gemma.loading.resolve_model_path` (which honours
HF_HUB_OFFLINE and the normal cache).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from .. import json_input
from ..convert import convert
from ..convert.checkpoint import DTYPES
from ..convert.keras_common import dtype_name
from ..convert.keras_h5 import read_json
from ..default_model import cache_dir
from ..errors import ModelFileError
from ..loading import resolve_model_path

# Backbone shapes, keras-hub's argument names.  Keras' `intermediate_dim` is twice
# Hugging Face's `intermediate_size` (keras-hub splits it over its two gate kernels).
_GEMMA_2B = dict(vocabulary_size=256_000, num_layers=18, num_query_heads=8, num_key_value_heads=1,
                 hidden_dim=2048, intermediate_dim=32_768, head_dim=256)
_GEMMA_7B = dict(vocabulary_size=256_000, num_layers=28, num_query_heads=16, num_key_value_heads=16,
                 hidden_dim=3072, intermediate_dim=49_152, head_dim=256)
_GEMMA2 = dict(use_post_ffw_norm=True, use_post_attention_norm=True, attention_logit_soft_cap=50.0,
               final_logit_soft_cap=30.0, use_sliding_window_attention=True, sliding_window_size=4096)
_GEMMA2_2B = dict(_GEMMA2, vocabulary_size=256_000, num_layers=26, num_query_heads=8, num_key_value_heads=4,
                  hidden_dim=2304, intermediate_dim=18_432, head_dim=256)
_GEMMA2_9B = dict(_GEMMA2, vocabulary_size=256_000, num_layers=42, num_query_heads=16, num_key_value_heads=8,
                  hidden_dim=3584, intermediate_dim=28_672, head_dim=256)
# 46 layers (keras-hub's description says 42; its parameter count, and HF's config, say 46).
# Queries are scaled by (hidden / heads) ** -0.5 = 144 ** -0.5, not head_dim's 128.
_GEMMA2_27B = dict(_GEMMA2, vocabulary_size=256_000, num_layers=46, num_query_heads=32, num_key_value_heads=16,
                   hidden_dim=4608, intermediate_dim=73_728, head_dim=128, query_head_dim_normalize=False)


# Gemma 3 (keras-hub's Gemma3CausalLM presets; text only here) as Hugging Face configs.
# keras-hub's "*_text" presets keep 262,144 embedding rows where Hugging Face's
# multimodal checkpoints pad to 262,208: random weights take keras-hub's shape.
_GEMMA3 = dict(model_type="gemma3_text", head_dim=256, query_pre_attn_scalar=256, sliding_window_pattern=6,
               rope_theta=1_000_000.0, rope_local_base_freq=10_000.0, vocab_size=262_144)
_GEMMA3_LARGE = dict(_GEMMA3, sliding_window=1024, max_position_embeddings=131_072,
                     rope_scaling={"rope_type": "linear", "factor": 8.0})
_GEMMA3_270M = dict(_GEMMA3, hidden_size=640, num_hidden_layers=18, num_attention_heads=4, num_key_value_heads=1,
                    intermediate_size=2048, sliding_window=512, max_position_embeddings=32_768)
_GEMMA3_1B = dict(_GEMMA3, hidden_size=1152, num_hidden_layers=26, num_attention_heads=4, num_key_value_heads=1,
                  intermediate_size=6912, sliding_window=512, max_position_embeddings=32_768)
_GEMMA3_4B = dict(_GEMMA3_LARGE, hidden_size=2560, num_hidden_layers=34, num_attention_heads=8,
                  num_key_value_heads=4, intermediate_size=10_240)
_GEMMA3_12B = dict(_GEMMA3_LARGE, hidden_size=3840, num_hidden_layers=48, num_attention_heads=16,
                   num_key_value_heads=8, intermediate_size=15_360)
_GEMMA3_27B = dict(_GEMMA3_LARGE, hidden_size=5376, num_hidden_layers=62, num_attention_heads=32,
                   num_key_value_heads=16, head_dim=128, query_pre_attn_scalar=168, intermediate_size=21_504)

# Gemma 3 with images: SigLIP so400m at 896 px pooled to 256 soft tokens (HF's vision_config).  The
# MedGemma presets keep Hugging Face's 262,208 embedding rows: keras-hub's recorded counts say so.
_SIGLIP_896 = dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                   num_attention_heads=16, image_size=896, patch_size=14, vision_use_head=False)


def _with_images(text: dict) -> dict:
    return dict(model_type="gemma3", text_config={**text, "vocab_size": 262_208}, vision_config=_SIGLIP_896,
                mm_tokens_per_image=256)


@dataclass(frozen=True)
class Preset:
    hf_repo: str | None  # None: no Hugging Face copy we can load (use the Kaggle handle)
    kaggle: str
    backbone: dict = field(default_factory=dict)  # GemmaBackbone(**backbone)
    instruct: bool = False  # chat-tuned: generate() also stops on <end_of_turn>
    hf_config: dict | None = None  # Gemma 3: the shape as a Hugging Face config instead


def _p(hf_repo, kaggle, backbone, instruct=False) -> Preset:
    return Preset(hf_repo, "kaggle://" + kaggle, backbone, instruct)


def _g3(hf_repo, kaggle, hf_config, instruct=False) -> Preset:
    return Preset(hf_repo, "kaggle://keras/gemma3/keras/" + kaggle, {}, instruct, hf_config)


def _med(hf_repo, kaggle, hf_config, instruct=False) -> Preset:
    return Preset(hf_repo, "kaggle://keras/medgemma/keras/" + kaggle, {}, instruct, hf_config)


PRESETS: dict[str, Preset] = {
    "gemma_2b_en": _p("google/gemma-2b", "keras/gemma/keras/gemma_2b_en/3", _GEMMA_2B),
    "gemma_instruct_2b_en": _p("google/gemma-2b-it", "keras/gemma/keras/gemma_instruct_2b_en/3", _GEMMA_2B, True),
    "gemma_1.1_instruct_2b_en": _p("google/gemma-1.1-2b-it", "keras/gemma/keras/gemma_1.1_instruct_2b_en/4",
                                   _GEMMA_2B, True),
    "code_gemma_1.1_2b_en": _p("google/codegemma-1.1-2b", "keras/codegemma/keras/code_gemma_1.1_2b_en/2", _GEMMA_2B),
    "code_gemma_2b_en": _p("google/codegemma-2b", "keras/codegemma/keras/code_gemma_2b_en/2", _GEMMA_2B),
    "gemma_7b_en": _p("google/gemma-7b", "keras/gemma/keras/gemma_7b_en/4", _GEMMA_7B),
    "gemma_instruct_7b_en": _p("google/gemma-7b-it", "keras/gemma/keras/gemma_instruct_7b_en/4", _GEMMA_7B, True),
    "gemma_1.1_instruct_7b_en": _p("google/gemma-1.1-7b-it", "keras/gemma/keras/gemma_1.1_instruct_7b_en/5",
                                   _GEMMA_7B, True),
    "code_gemma_7b_en": _p("google/codegemma-7b", "keras/codegemma/keras/code_gemma_7b_en/3", _GEMMA_7B),
    "code_gemma_instruct_7b_en": _p("google/codegemma-7b-it", "keras/codegemma/keras/code_gemma_instruct_7b_en/3",
                                    _GEMMA_7B, True),
    "code_gemma_1.1_instruct_7b_en": _p("google/codegemma-1.1-7b-it",
                                        "keras/codegemma/keras/code_gemma_1.1_instruct_7b_en/3", _GEMMA_7B, True),
    "gemma2_2b_en": _p("google/gemma-2-2b", "keras/gemma2/keras/gemma2_2b_en/2", _GEMMA2_2B),
    "gemma2_instruct_2b_en": _p("google/gemma-2-2b-it", "keras/gemma2/keras/gemma2_instruct_2b_en/2",
                                _GEMMA2_2B, True),
    "gemma2_9b_en": _p("google/gemma-2-9b", "keras/gemma2/keras/gemma2_9b_en/4", _GEMMA2_9B),
    "gemma2_instruct_9b_en": _p("google/gemma-2-9b-it", "keras/gemma2/keras/gemma2_instruct_9b_en/4",
                                _GEMMA2_9B, True),
    "gemma2_27b_en": _p("google/gemma-2-27b", "keras/gemma2/keras/gemma2_27b_en/3", _GEMMA2_27B),
    "gemma2_instruct_27b_en": _p("google/gemma-2-27b-it", "keras/gemma2/keras/gemma2_instruct_27b_en/3",
                                 _GEMMA2_27B, True),
    # ShieldGemma is a Gemma 2 fine-tune that answers in its own prompt format
    # (not the chat turns), so <end_of_turn> is not added to its stop ids.
    "shieldgemma_2b_en": _p("google/shieldgemma-2b", "google/shieldgemma/keras/shieldgemma_2b_en/2", _GEMMA2_2B),
    "shieldgemma_9b_en": _p("google/shieldgemma-9b", "google/shieldgemma/keras/shieldgemma_9b_en/2", _GEMMA2_9B),
    "shieldgemma_27b_en": _p("google/shieldgemma-27b", "google/shieldgemma/keras/shieldgemma_27b_en/2", _GEMMA2_27B),
    # Unsure: the Cell2Sentence authors publish these on Hugging Face under their
    # lab's organisation; the repository names are taken from their model cards.
    "c2s_scale_gemma_2_2b_en": _p("vandijklab/C2S-Scale-Gemma-2-2B",
                                  "keras/cell2sentence/keras/c2s_scale_gemma_2_2b_en/1", _GEMMA2_2B),
    "c2s_scale_gemma_2_27b_en": _p("vandijklab/C2S-Scale-Gemma-2-27B",
                                   "keras/cell2sentence/keras/c2s_scale_gemma_2_27b_en/1", _GEMMA2_27B),
    # VaultGemma's Hugging Face checkpoint is its own architecture ("vaultgemma"),
    # which mlx_gemma does not build; only the Keras preset (via Kaggle) can work.
    "vault_gemma_1b_en": _p(None, "keras/vaultgemma/keras/vault_gemma_1b_en/2", {}),
    # Gemma 3, text only (the "*_text" presets are the language half of the multimodal models).
    "gemma3_270m": _g3("google/gemma-3-270m", "gemma3_270m/3", _GEMMA3_270M),
    "gemma3_instruct_270m": _g3("google/gemma-3-270m-it", "gemma3_instruct_270m/4", _GEMMA3_270M, True),
    "gemma3_1b": _g3("google/gemma-3-1b-pt", "gemma3_1b/3", _GEMMA3_1B),
    "gemma3_instruct_1b": _g3("google/gemma-3-1b-it", "gemma3_instruct_1b/3", _GEMMA3_1B, True),
    "gemma3_4b_text": _g3("google/gemma-3-4b-pt", "gemma3_4b_text/2", _GEMMA3_4B),
    "gemma3_instruct_4b_text": _g3("google/gemma-3-4b-it", "gemma3_instruct_4b_text/3", _GEMMA3_4B, True),
    "gemma3_12b_text": _g3("google/gemma-3-12b-pt", "gemma3_12b_text/3", _GEMMA3_12B),
    "gemma3_instruct_12b_text": _g3("google/gemma-3-12b-it", "gemma3_instruct_12b_text/3", _GEMMA3_12B, True),
    "gemma3_27b_text": _g3("google/gemma-3-27b-pt", "gemma3_27b_text/4", _GEMMA3_27B),
    "gemma3_instruct_27b_text": _g3("google/gemma-3-27b-it", "gemma3_instruct_27b_text/3", _GEMMA3_27B, True),
    # MedGemma: Gemma 3 trained on medical text and images (keras-hub's gemma3_presets.py; the
    # Hugging Face repositories of Google's MedGemma collection).  They load as Gemma 3, with images
    # except the 27B text model.
    "medgemma_4b": _med("google/medgemma-4b-pt", "medgemma_4b/1", _with_images(_GEMMA3_4B)),
    "medgemma_instruct_4b": _med("google/medgemma-4b-it", "medgemma_instruct_4b/1", _with_images(_GEMMA3_4B), True),
    "medgemma_instruct_27b": _med("google/medgemma-27b-it", "medgemma_instruct_27b/1", _with_images(_GEMMA3_27B),
                                  True),
    "medgemma_instruct_27b_text": _med("google/medgemma-27b-text-it", "medgemma_instruct_27b_text/1", _GEMMA3_27B,
                                       True),
    "medgemma_1.5_instruct_4b": _med("google/medgemma-1.5-4b-it", "medgemma_1.5_instruct_4b/1",
                                     _with_images(_GEMMA3_4B), True),
}


# Gemma 4 (keras-hub's gemma4/gemma4_presets.py) -> the Hugging Face repositories of Google's Gemma 4
# collection.  Apart from PRESETS: their shapes are not recorded here (no load_weights=False), and
# Gemma4CausalLM builds them.  The "*_assistant" MTP drafters are not listed: they only draft for
# keras-hub's speculative generate and have no model of their own here.
def _g4(hf_repo: str, kaggle: str, instruct: bool = False) -> Preset:
    return Preset(hf_repo, "kaggle://keras/gemma4/keras/" + kaggle, {}, instruct)


GEMMA4_PRESETS: dict[str, Preset] = {
    "gemma4_2b": _g4("google/gemma-4-E2B", "gemma4_2b/2"),
    "gemma4_instruct_2b": _g4("google/gemma-4-E2B-it", "gemma4_instruct_2b/2", True),
    "gemma4_4b": _g4("google/gemma-4-E4B", "gemma4_4b/2"),
    "gemma4_instruct_4b": _g4("google/gemma-4-E4B-it", "gemma4_instruct_4b/2", True),
    "gemma4_26b_a4b": _g4("google/gemma-4-26B-A4B", "gemma4_26b_a4b/2"),
    "gemma4_instruct_26b_a4b": _g4("google/gemma-4-26B-A4B-it", "gemma4_instruct_26b_a4b/2", True),
    "gemma4_31b": _g4("google/gemma-4-31B", "gemma4_31b/2"),
    "gemma4_instruct_31b": _g4("google/gemma-4-31B-it", "gemma4_instruct_31b/2", True),
}


def preset_names() -> list[str]:
    return sorted(PRESETS)


def _unknown(handle: str) -> ModelFileError:
    close = [n for n in (*PRESETS, *GEMMA4_PRESETS) if handle.lower().replace("-", "_") in n][:5]
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return ModelFileError(
        handle, "not a known preset name, an 'hf://org/repo' or 'kaggle://...' handle, or an existing folder."
        f"{hint} Known presets: {', '.join(preset_names())}")


def preset_of(handle) -> Preset | None:
    """The table entry for a preset name (None for handles and folders)."""
    return PRESETS.get(handle) if isinstance(handle, str) else None


def hf_repo_of(handle: str) -> str | None:
    """The Hugging Face repository a preset name or an hf:// handle points at (None otherwise)."""
    if handle.startswith("hf://"):
        repo = handle[len("hf://"):].strip("/")
        if repo.count("/") != 1:
            raise ModelFileError(handle, "an hf:// handle names one repository: 'hf://org/name'")
        return repo
    preset = PRESETS.get(handle) or GEMMA4_PRESETS.get(handle)
    if preset is None:
        return None
    if preset.hf_repo is None:
        raise ModelFileError(handle, f"this preset has no Hugging Face checkpoint mlx_gemma can load; "
                                     f"use its Keras preset: from_preset({preset.kaggle!r})")
    return preset.hf_repo


def resolve_preset(handle: str | os.PathLike, revision: str | None = None) -> Path:
    """A local MLX / Hugging Face model folder for any handle `from_preset` accepts."""
    if isinstance(handle, os.PathLike):
        handle = os.fspath(handle)
    if not isinstance(handle, str) or not handle:
        raise ModelFileError(None, f"a preset must be a name, a handle or a folder, got {handle!r}")
    if handle.startswith("kaggle://"):
        return keras_preset_folder(_kaggle_download(handle))
    repo = hf_repo_of(handle)
    if repo is not None:
        return resolve_model_path(repo, revision)
    if "://" in handle:
        raise ModelFileError(handle, "unknown scheme: use a preset name, 'hf://org/repo', 'kaggle://...' or a folder")
    folder = Path(handle).expanduser()
    if not folder.is_dir():
        raise _unknown(handle)
    if is_keras_preset(folder):
        return keras_preset_folder(folder)
    return resolve_model_path(folder)


def _kaggle_download(handle: str) -> Path:
    try:  # deferred: kagglehub is optional (and heavy), needed only for kaggle:// handles
        import kagglehub
    except ImportError:
        raise ModelFileError(
            handle, "Kaggle presets need the `kagglehub` package, which is not installed. Either "
            "`pip install kagglehub` (and log in to Kaggle), or download the preset yourself -- "
            f"`kagglehub.model_download({handle[len('kaggle://'):]!r})` or the Kaggle website -- and pass "
            "the downloaded folder to from_preset()") from None
    try:
        return Path(kagglehub.model_download(handle[len("kaggle://"):]))
    except Exception as e:  # kagglehub raises many kinds (network, auth, not found)
        raise ModelFileError(handle, f"kagglehub could not download it: {e}") from e


# ----- keras-hub preset folders: converted once into the cache --------------------------


def _keras_config_json(folder: Path):
    """The decoded config.json of a would-be keras-hub folder, or None when it cannot be read."""
    config = folder / "config.json"
    if not config.is_file():
        return None
    try:
        return read_json(str(config), "config.json")
    except ModelFileError:
        return None


def is_keras_preset(folder: Path) -> bool:
    """A keras-hub preset folder: config.json names a Keras class, not a model_type."""
    data = _keras_config_json(folder)
    return isinstance(data, dict) and "class_name" in data and "model_type" not in data


def _fingerprint(folder: Path) -> str:
    """Cheap identity of a preset folder's files (names, sizes, modification times)."""
    h = hashlib.sha256(str(folder.resolve()).encode())
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        st = path.stat()
        h.update(f"{path.relative_to(folder)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _keras_dtype(folder: Path) -> str | None:
    """The dtype policy the preset was saved with: converting to it loses nothing.
    Only a hint: whatever else the file says, the converter judges it."""
    top = _keras_config_json(folder)
    config = top.get("config") if isinstance(top, dict) else None
    dtype = dtype_name(config) if isinstance(config, dict) else None
    return dtype if dtype in DTYPES else None


def keras_preset_folder(folder: Path) -> Path:
    """An MLX folder converted from a keras-hub preset folder, made once per preset version.

    Lives in `$MLX_GEMMA_CACHE/keras-presets/<name>-<fingerprint>`; a changed preset
    (any file's size or time) gets a fresh conversion.
    """
    folder = Path(folder)
    if not is_keras_preset(folder):
        raise ModelFileError(folder, "not a keras-hub preset folder (its config.json names no Keras class)")
    dest = cache_dir() / "keras-presets" / f"{folder.resolve().name}-{_fingerprint(folder)}"
    if (dest / "config.json").is_file():
        return dest
    try:
        convert(keras_path=folder, mlx_path=dest, dtype=_keras_dtype(folder), progress=False)
    except ModelFileError:
        if not (dest / "config.json").is_file():  # another process may have converted it meanwhile
            raise
    return dest


def keras_preprocessor_settings(handle) -> dict:
    """`sequence_length` / `add_start_token` / `add_end_token` from a keras-hub preset
    folder's preprocessor.json (what keras-hub's from_preset builds); {} otherwise."""
    if not isinstance(handle, (str, os.PathLike)):
        return {}
    handle = os.fspath(handle)
    if handle.startswith("kaggle://"):
        folder = _kaggle_download(handle)
    elif "://" in handle or handle in PRESETS:
        return {}
    else:
        folder = Path(handle).expanduser()
    path = folder / "preprocessor.json"
    if not is_keras_preset(folder) or not path.is_file():
        return {}
    top = read_json(str(path), "preprocessor.json")
    if not isinstance(top, dict):
        raise ModelFileError(path, f"must hold a JSON object, found {json_input.json_type(top)}")
    config = json_input.field(top, "config", (dict, type(None)), path, None, ModelFileError) or {}
    out = {}
    for key, kind in (("sequence_length", int), ("add_start_token", bool), ("add_end_token", bool)):
        if key in config:
            out[key] = json_input.field(config, key, kind, path, error=ModelFileError, where="config.")
    if out.get("sequence_length", 1) <= 0:
        raise ModelFileError(path, f"'config.sequence_length' must be a positive integer, got {out['sequence_length']}")
    return out


def tokenizer_file(handle: str, revision: str | None = None) -> Path:
    """Only the tokenizer of a preset (for `load_weights=False`): one small hub file, or the
    folder that holds it (HF, MLX and keras-hub layouts all do); never the weights."""
    repo = hf_repo_of(handle)
    if repo is None:
        if handle.startswith("kaggle://"):
            return _kaggle_download(handle)
        folder = Path(handle).expanduser()
        if not folder.is_dir():
            raise _unknown(handle)
        return folder
    # deferred: huggingface_hub is a heavy import, needed only for a hub preset
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(repo, "tokenizer.model", revision=revision))
    except LocalEntryNotFoundError as e:
        raise ModelFileError(repo, "tokenizer.model is not in the local Hugging Face cache and the hub cannot "
                                   "be reached (offline, or HF_HUB_OFFLINE=1)") from e
    except (HfHubHTTPError, OSError) as e:
        raise ModelFileError(repo, f"could not download tokenizer.model from the Hugging Face hub: {e}") from e


def keras_backbone_config(folder: Path) -> dict:
    """A keras-hub preset folder's GemmaBackbone arguments (its config.json "config")."""
    config = read_json(str(folder / "config.json"), "config.json")
    args = config.get("config") if isinstance(config, dict) else None
    if not isinstance(args, dict):
        raise ModelFileError(folder / "config.json", "has no 'config' object with the backbone's settings")
    return {k: v for k, v in args.items() if k not in ("name", "trainable", "dtype")}
