"""Read the `Gemma4AudioEncoder` of a keras-hub Gemma4Backbone preset (E2B / E4B) into transformers'
terms: a `gemma4_audio` config (models/gemma4_audio.py), HF weight names under `model.audio_tower.`
and `model.embed_audio.`, and the preset's `Gemma4AudioConverter` as the `feature_extractor` entry
of processor_config.json (mlx_gemma.audio).  keras_gemma4.py calls it; checked numerically against
keras-hub by tests/test_convert_keras_gemma4.py.

What keras-hub 0.32 does (`keras_hub/src/models/gemma4/gemma4_audio_encoder.py`,
`gemma4_audio_converter.py`; its HF -> Keras map `utils/transformers/convert_gemma4.py`):

* Variables (Keras shape -> HF name), D conformer width, c0 / c1 the sub-sampling channels, f the
  mel positions after them (c0 // 4), K the light conv's kernel, P output_proj_dims, H text width;
  under `layers/gemma4_audio_encoder/`, block i is `conformer_blocks/gemma4_audio_conformer_block[_i]`:

      layers/gemma4_audio_sub_sample_conv_projection/conv_{0,1}/conv  [3,3,in,out]  subsample_conv_projection
                                                        .layer{0,1}.conv.weight [out,in,3,3] (torch)
        .../conv_{0,1}/norm  [out]                      .layer{0,1}.norm.weight (LayerNorm, no bias)
        .../input_proj       [c1 f, D]                  .input_proj_linear.weight [D, c1 f]
      block/ffw_{start,end}/ffw_{1,2}/dense  [in,out]   layers.i.feed_forward{1,2}.ffw_layer_{1,2}.linear.weight
      block/ffw_{start,end}/{pre,post}_norm  [D]        ...pre_layer_norm, post_layer_norm
      block/attention/attn/{q,k,v}_proj/dense [D,D]     layers.i.self_attn.{q,k,v}_proj.linear.weight
      block/attention/attn/vars/0            [D/heads]  self_attn.per_dim_scale
      block/attention/attn/rpe/vars/0        [D,D]      self_attn.relative_k_proj.weight [out,in]
      block/attention/out_proj/dense         [D,D]      self_attn.post.linear.weight
      block/attention/{pre_attn,post}_norm   [D]        norm_pre_attn, norm_post_attn
      block/lconv/linear_{start,end}/dense   [D,2D],[D,D]  lconv1d.linear_{start,end}.linear.weight
      block/lconv/depthwise_conv             [K,D,1]    lconv1d.depthwise_conv1d.weight [D,1,K]
      block/lconv/{pre,conv}_norm, block/norm [D]       lconv1d.pre_layer_norm, lconv1d.conv_norm, norm_out
      <each clipped dense>/vars/0..3         []         .input_min, .input_max, .output_min, .output_max
      layers/dense/vars/0, 1                 [D,P],[P]  output_proj.weight [P,D], output_proj.bias
      audio_output_projection                [P,H]      model.embed_audio.embedding_projection.weight [H,P]

  The output norm is weightless (HF's embedder pre-projection norm); every clipped dense is clipped
  (keras-hub's audio layers always are: use_clipped_linears).
* Numerics: the conformer, its chunked attention and relative-position term are transformers'
  for the settings the published presets use (context_right 0, chunk size = context_left - 1).
  Where they differ elsewhere, refused (typed errors naming the field): keras-hub's relative
  positions run max_backward ... -max_forward (HF: context // 2 ... 0) and its attention never
  looks right; HF fixes 3x3 stride-2 sub-sampling, one temporal stride, an output projection,
  epsilon 1e-6 on the feed-forward / attention / block norms and sizes its input projection for
  c0 // 4 mel positions.  keras-hub also zeroes padded frames before the light conv (HF does not):
  the conv is causal and padding trails the clip, so valid tokens agree; keras-hub returns the
  padded tokens too, which HF (and we) drop.  keras-hub's converter pads every clip to
  `max_audio_length` seconds and does not zero padded frames; transformers' extractor (ours)
  pads to a multiple of 128 samples and masks them: the valid frames agree.  keras-hub's
  preprocessor counts a clip's valid frames as samples // hop and its soft tokens as
  ceil(frames / 4); transformers counts only frames whose window lies inside the clip, and tokens
  through the two stride-2 masks, so a clip may get one token fewer.  We follow transformers (whose
  processor settings Google's checkpoints carry).  The backbone's `num_audio_tokens_per_clip` is
  not read (keras-hub's preprocessor no longer uses it either).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np

from ..arguments import is_real
from ..audio import LogMelSettings
from ..errors import ConfigError, UnsupportedModelError
from ..models.gemma4_audio import SUBSAMPLE_KERNEL, SUBSAMPLE_STRIDE
from .keras_common import float_setting, int_setting

_AUDIO = "layers/gemma4_audio_encoder"
_CLIPS = ("input_min", "input_max", "output_min", "output_max")  # Gemma4ClippableDense's variables, in order
AUDIO_CONVERTER_FILE = "audio_converter.json"  # keras-hub's preset file for the Gemma4AudioConverter
_CONVERTER_LIMIT = 1 << 20  # a small JSON file; a larger one is not an audio converter config


def _ceil_half(n: int) -> int:
    return -(-n // 2)


def _number(path, c: dict, key: str, default: float, minimum: float = -math.inf) -> float:
    """c[key] (or `default`) as a finite float >= minimum (float_setting takes positive numbers only)."""
    v = c.get(key, default)
    if v is None:
        v = default
    if not is_real(v) or not math.isfinite(float(v)) or float(v) < minimum:
        raise ConfigError(path, f"{key} must be a finite number >= {minimum}, got {v!r:.80}")
    return float(v)


def _refuse_unmapped(a: dict, where: str, path) -> None:
    """The keras-hub settings transformers' Gemma4AudioModel cannot express (module docstring)."""
    kernels = [SUBSAMPLE_KERNEL, SUBSAMPLE_KERNEL]
    strides = [SUBSAMPLE_STRIDE, SUBSAMPLE_STRIDE]
    if a.get("sscp_kernel_sizes", [kernels] * 2) != [kernels] * 2 or \
            a.get("sscp_stride_sizes", [strides] * 2) != [strides] * 2:
        raise UnsupportedModelError(path, f"{where}sscp_kernel_sizes / sscp_stride_sizes: transformers' audio tower "
                                          "sub-samples with two 3x3 stride-2 convolutions only")
    if int_setting(path, a, "reduction_factor", 1, limit=1 << 10) != 1:
        raise UnsupportedModelError(path, f"{where}reduction_factor: transformers' audio tower has no temporal stride")
    if int_setting(path, a, "context_right", 0, minimum=0, limit=1 << 16) != 0:
        raise UnsupportedModelError(path, f"{where}context_right: keras-hub's audio attention never looks right "
                                          "and places its relative positions unlike transformers'")
    chunk, left = int_setting(path, a, "chunk_size", 12, limit=1 << 16), int_setting(path, a, "context_left", 13,
                                                                                       limit=1 << 16)
    if left < 1 or (chunk + left - 1) // 2 != left - 1:  # HF's context // 2 vs keras-hub's max_backward
        raise UnsupportedModelError(path, f"{where}chunk_size {chunk} / context_left {left}: keras-hub and "
                                          "transformers give the relative position term different distances "
                                          "(they agree when chunk_size is context_left - 1 or context_left)")
    for key in ("norm_eps", "sscp_norm_eps"):
        if float_setting(path, a, key, 1e-6) != 1e-6:
            raise UnsupportedModelError(path, f"{where}{key}: transformers builds the conformer's norms with "
                                              "epsilon 1e-6; other values are not mapped")
    if "output_proj_dims" in a and a["output_proj_dims"] is None:
        raise UnsupportedModelError(path, f"{where}output_proj_dims null: transformers' audio tower always "
                                          "projects its output")


def encoder_settings(c: dict, path, key: str, class_name: str) -> dict | None:
    """The `config` of the backbone's serialized encoder `c[key]` (a `class_name`), or None without one."""
    enc = c.get(key)
    if enc is None:
        return None
    if not isinstance(enc, dict) or not isinstance(enc.get("config"), dict):
        raise ConfigError(path, f"{key} must be null or a serialized {class_name}")
    if enc.get("class_name") != class_name:
        raise UnsupportedModelError(path, f"{key} class {enc.get('class_name')!r:.80} is not {class_name}")
    return enc["config"]


def audio_config(c: dict, path, text_hidden: int) -> dict[str, Any] | None:
    """HF `gemma4_audio` config of the backbone's Gemma4AudioEncoder, or None without one."""
    a, where = encoder_settings(c, path, "audio_encoder", "Gemma4AudioEncoder"), "audio_encoder."
    if a is None:
        return None
    _refuse_unmapped(a, where, path)
    if int_setting(path, a, "output_dim", limit=1 << 16) != text_hidden:
        raise ConfigError(path, "the audio encoder's output_dim must equal the decoder's hidden_dim")
    channels = a.get("sscp_conv_channels", [128, 32])
    if not isinstance(channels, list) or len(channels) != 2:
        raise ConfigError(path, f"{where}sscp_conv_channels must list two channel counts, got {channels!r:.80}")
    c0, c1 = (int_setting(path, {"sscp_conv_channels": n}, "sscp_conv_channels", limit=1 << 14) for n in channels)
    mels = int_setting(path, a, "input_feat_size", 128, limit=1 << 14)
    if _ceil_half(_ceil_half(mels)) != c0 // 4:  # keras-hub sizes input_proj from the mels, HF from c0
        raise UnsupportedModelError(path, f"{where}input_feat_size {mels} with sscp_conv_channels[0] {c0}: "
                                          "transformers' tower takes ceil(ceil(mels / 2) / 2) == channels // 4")
    return {
        "model_type": "gemma4_audio",
        "hidden_size": int_setting(path, a, "hidden_size", limit=1 << 16),
        "num_hidden_layers": int_setting(path, a, "num_layers", limit=1024),
        "num_attention_heads": int_setting(path, a, "num_heads", limit=1024),
        "hidden_act": "silu",  # Gemma4AudioConformerFeedForward / LightConv1d: ops.silu
        "subsampling_conv_channels": [c0, c1],
        "conv_kernel_size": int_setting(path, a, "conv_kernel_size", 5, limit=1 << 10),
        "residual_weight": float_setting(path, a, "residual_weight", 0.5),
        "attention_chunk_size": int_setting(path, a, "chunk_size", 12, limit=1 << 16),
        "attention_context_left": int_setting(path, a, "context_left", 13, limit=1 << 16),
        "attention_context_right": 0,
        "attention_logit_cap": float_setting(path, a, "logit_cap", 50.0),
        "attention_invalid_logits_value": _number(path, a, "invalid_logit_value", -1e9),
        "use_clipped_linears": True,  # keras-hub's Gemma4ClippableDense default, never turned off in the encoder
        "rms_norm_eps": float_setting(path, a, "norm_eps", 1e-6),
        "gradient_clipping": float_setting(path, a, "gradient_clipping", 1e10),
        "output_proj_dims": int_setting(path, a, "output_proj_dims", 1536, limit=1 << 16),  # keras-hub's default
    }


def _clipped(found: dict, keras: str, hf: str, shape: tuple[int, ...]) -> None:
    """A Gemma4ClippableDense: its kernel and its four scalar bounds."""
    found[f"{keras}/dense/vars/0"] = (f"{hf}.linear.weight", shape)
    for j, bound in enumerate(_CLIPS):
        found[f"{keras}/vars/{j}"] = (f"{hf}.{bound}", ())


def _block_variables(a: dict, i: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    d, k, heads = a["hidden_size"], a["conv_kernel_size"], a["num_attention_heads"]
    keras = f"{_AUDIO}/conformer_blocks/gemma4_audio_conformer_block" + (f"_{i}" if i else "")
    hf = f"model.audio_tower.layers.{i}"
    found: dict[str, tuple[str, tuple[int, ...]]] = {}
    for part, name in (("ffw_start", "feed_forward1"), ("ffw_end", "feed_forward2")):
        _clipped(found, f"{keras}/{part}/ffw_1", f"{hf}.{name}.ffw_layer_1", (d, 4 * d))
        _clipped(found, f"{keras}/{part}/ffw_2", f"{hf}.{name}.ffw_layer_2", (4 * d, d))
        found[f"{keras}/{part}/pre_norm/vars/0"] = (f"{hf}.{name}.pre_layer_norm.weight", (d,))
        found[f"{keras}/{part}/post_norm/vars/0"] = (f"{hf}.{name}.post_layer_norm.weight", (d,))
    for proj in ("q_proj", "k_proj", "v_proj"):
        _clipped(found, f"{keras}/attention/attn/{proj}", f"{hf}.self_attn.{proj}", (d, d))
    _clipped(found, f"{keras}/attention/out_proj", f"{hf}.self_attn.post", (d, d))
    _clipped(found, f"{keras}/lconv/linear_start", f"{hf}.lconv1d.linear_start", (d, 2 * d))
    _clipped(found, f"{keras}/lconv/linear_end", f"{hf}.lconv1d.linear_end", (d, d))
    found.update({
        f"{keras}/attention/attn/vars/0": (f"{hf}.self_attn.per_dim_scale", (d // heads,)),
        f"{keras}/attention/attn/rpe/vars/0": (f"{hf}.self_attn.relative_k_proj.weight", (d, d)),
        f"{keras}/attention/pre_attn_norm/vars/0": (f"{hf}.norm_pre_attn.weight", (d,)),
        f"{keras}/attention/post_norm/vars/0": (f"{hf}.norm_post_attn.weight", (d,)),
        f"{keras}/lconv/depthwise_conv/vars/0": (f"{hf}.lconv1d.depthwise_conv1d.weight", (k, d, 1)),
        f"{keras}/lconv/pre_norm/vars/0": (f"{hf}.lconv1d.pre_layer_norm.weight", (d,)),
        f"{keras}/lconv/conv_norm/vars/0": (f"{hf}.lconv1d.conv_norm.weight", (d,)),
        f"{keras}/norm/vars/0": (f"{hf}.norm_out.weight", (d,)),
    })
    return found


def audio_variables(a: dict, text_hidden: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Keras dataset path -> (HF name, Keras shape) for the audio tower and its embedder."""
    d, p = a["hidden_size"], a["output_proj_dims"]
    c0, c1 = a["subsampling_conv_channels"]
    sscp, tower = f"{_AUDIO}/layers/gemma4_audio_sub_sample_conv_projection", "model.audio_tower.subsample_conv_projection"
    found = {
        f"{sscp}/conv_0/conv/vars/0": (f"{tower}.layer0.conv.weight", (3, 3, 1, c0)),
        f"{sscp}/conv_0/norm/vars/0": (f"{tower}.layer0.norm.weight", (c0,)),
        f"{sscp}/conv_1/conv/vars/0": (f"{tower}.layer1.conv.weight", (3, 3, c0, c1)),
        f"{sscp}/conv_1/norm/vars/0": (f"{tower}.layer1.norm.weight", (c1,)),
        f"{sscp}/input_proj/vars/0": (f"{tower}.input_proj_linear.weight", (c1 * (c0 // 4), d)),
        f"{_AUDIO}/layers/dense/vars/0": ("model.audio_tower.output_proj.weight", (d, p)),
        f"{_AUDIO}/layers/dense/vars/1": ("model.audio_tower.output_proj.bias", (p,)),
        f"{_AUDIO}/audio_output_projection/vars/0": ("model.embed_audio.embedding_projection.weight", (p, text_hidden)),
    }
    for i in range(a["num_hidden_layers"]):
        found.update(_block_variables(a, i))
    return found


def audio_to_hf(name: str, a: np.ndarray) -> np.ndarray:
    """One audio variable from Keras' layout to transformers' (torch) layout."""
    if name.endswith(_CLIPS):
        return a.reshape(())  # a clip bound: a scalar, as HF's buffers
    if name.endswith("conv.weight") and a.ndim == 4:
        return a.transpose(3, 2, 0, 1)  # Conv2D [kT, kF, in, out] -> torch [out, in, kT, kF]
    if name.endswith("depthwise_conv1d.weight"):
        return a.transpose(1, 2, 0)  # DepthwiseConv1D [K, D, 1] -> torch [D, 1, K]
    if a.ndim == 2:
        return a.T  # Keras Dense kernels are [in, out]; HF linears [out, in]
    return a  # norms, per_dim_scale, the output bias


def feature_extractor(folder: str) -> dict[str, Any] | None:
    """processor_config.json's `feature_extractor` (transformers' Gemma4AudioFeatureExtractor keys) for
    the preset's audio_converter.json, or None when the preset has none (the extractor's defaults)."""
    path = os.path.join(folder, AUDIO_CONVERTER_FILE)
    if not os.path.isfile(path):
        return None
    if os.path.getsize(path) > _CONVERTER_LIMIT:
        raise ConfigError(path, f"{AUDIO_CONVERTER_FILE} is larger than 1 MiB")
    try:
        with open(path, encoding="utf-8") as f:
            top = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(path, f"not JSON: {e}") from None
    if not isinstance(top, dict) or not isinstance(top.get("config"), dict):
        raise ConfigError(path, "must hold a serialized Gemma4AudioConverter")
    if top.get("class_name") != "Gemma4AudioConverter":
        raise UnsupportedModelError(path, f"class {top.get('class_name')!r:.80} is not Gemma4AudioConverter")
    c = top["config"]
    rate = int_setting(path, c, "sampling_rate", 16_000, limit=1 << 20)
    hop, fft = int_setting(path, c, "stride", 160, limit=1 << 16), int_setting(path, c, "num_fft_bins", 512, limit=1 << 16)
    window = int_setting(path, {"frame_length": c.get("frame_length") or fft}, "frame_length", limit=1 << 16)
    smallest = 1 << (window - 1).bit_length()  # transformers' fft_length: the next power of two (or twice it)
    if fft not in (smallest, 2 * smallest):
        raise UnsupportedModelError(path, f"num_fft_bins {fft} for a {window}-sample window: transformers' "
                                          f"extractor uses {smallest} (or {2 * smallest} with fft_overdrive)")
    out = {
        "feature_extractor_type": "Gemma4AudioFeatureExtractor",
        "feature_size": int_setting(path, c, "num_mels", 128, limit=1 << 14),
        "sampling_rate": rate,
        "frame_length_ms": window * 1000.0 / rate, "hop_length_ms": hop * 1000.0 / rate,
        "frame_length": window, "hop_length": hop, "fft_length": fft, "fft_overdrive": fft == 2 * smallest,
        "min_frequency": _number(path, c, "min_frequency", 0.0, minimum=0.0),
        "max_frequency": float_setting(path, c, "max_frequency", 8000.0),
        "mel_floor": float_setting(path, c, "mel_floor", 1e-5),  # Gemma4AudioConverter's default
        "max_length": int_setting(path, c, "max_audio_length", 30, limit=1 << 16) * rate,
        "preemphasis": 0.0, "dither": 0.0, "input_scale_factor": 1.0,  # the converter has none of these
    }
    for key in ("per_bin_mean", "per_bin_stddev"):
        if c.get(key) is not None:
            out[key] = c[key]
    LogMelSettings.from_dict(out, path)  # refuse here what loading the written folder would refuse
    return out


def is_audio_weight(name: str) -> bool:
    """Whether HF name `name` belongs to the audio tower or its embedder (read by `audio_to_hf`)."""
    return name.startswith(("model.audio_tower.", "model.embed_audio."))
