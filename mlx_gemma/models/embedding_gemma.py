"""EmbeddingGemma: a bidirectional Gemma 3 text encoder, mean pooling, Dense projections, L2 norm.

As sentence-transformers packages `google/embeddinggemma-300m`: module 0 is a
`Gemma3TextModel` with `use_bidirectional_attention: true` (the folder's root),
then Pooling (mean over the real tokens), two bias-free Dense layers with the
identity activation (768 -> 3072 -> 768) and Normalize.  The blocks are Gemma 3's
(models/gemma3.py); only the masks differ: every token sees every real token
(global layers) or those within a symmetric band (sliding layers).

The sentence-transformers settings (pooling mode, the Dense shapes, Normalize)
reach `ModelArgs.from_dict` under the config key `"sentence_transformers"`, put
there by the folder reader (embedding_folder.py), so this module reads no files.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn

from ..errors import ConfigError
from . import gemma3
from .decoder import DecoderStack

POOLING_MODES = ("mean",)  # sentence-transformers' Pooling modes we run
ACTIVATIONS = {  # Dense activation_function (its torch class path) -> the function
    "torch.nn.modules.linear.Identity": lambda x: x,
    "torch.nn.modules.activation.Tanh": mx.tanh,  # sentence-transformers' default for Dense
}


@dataclass
class DenseArgs:
    in_features: int
    out_features: int
    bias: bool
    activation_function: str  # a key of ACTIVATIONS


@dataclass
class ModelArgs:
    text: gemma3.ModelArgs  # the Gemma 3 backbone, with the band width as its sliding_window
    pooling_mode: str = "mean"
    dense: list[DenseArgs] = field(default_factory=list)
    normalize: bool = True  # a Normalize module follows the Dense layers
    model_type: str = "embedding_gemma"

    @property
    def hidden_size(self) -> int:
        return self.text.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.text.vocab_size

    @property
    def dimensions(self) -> int:
        """Width of the embeddings: the last Dense layer's output, else the hidden size."""
        return self.dense[-1].out_features if self.dense else self.text.hidden_size

    @classmethod
    def from_dict(cls, config: dict, path=None) -> "ModelArgs":
        st = config.get("sentence_transformers")
        if not isinstance(st, dict):
            raise ConfigError(path, "an EmbeddingGemma config needs its sentence-transformers modules")
        text = dict(config, use_bidirectional_attention=False, model_type="gemma3_text")
        text.pop("sentence_transformers")
        if isinstance(text.get("sliding_window"), int) and not isinstance(text["sliding_window"], bool):
            # transformers' Gemma3TextConfig turns the window w of a bidirectional model into the
            # band |q - k| < w // 2 + 1 ("due to fa we set exclusive bounds"); we keep the band.
            text["sliding_window"] = text["sliding_window"] // 2 + 1
        args = cls(text=gemma3.ModelArgs.from_dict(text, path), pooling_mode=st["pooling_mode"],
                   dense=[DenseArgs(**d) for d in st["dense"]], normalize=st["normalize"])
        args.check(path)
        return args

    def check(self, path) -> None:
        """The module chain fits together; each problem is a ConfigError naming `path`."""
        if self.pooling_mode not in POOLING_MODES:
            raise ConfigError(path, f"pooling mode {self.pooling_mode!r:.80} is not supported "
                                    f"(supported: {', '.join(POOLING_MODES)})")
        width = self.text.hidden_size
        for i, d in enumerate(self.dense):
            if d.in_features != width:
                raise ConfigError(path, f"Dense layer {i} takes {d.in_features} features, "
                                        f"but the layer before it gives {width}")
            if d.activation_function not in ACTIVATIONS:
                raise ConfigError(path, f"Dense layer {i}: activation {d.activation_function!r:.120} "
                                        f"is not supported (supported: {', '.join(ACTIVATIONS)})")
            width = d.out_features


class Dense(nn.Module):
    """sentence-transformers' Dense: activation(linear(x)); weights `linear.weight` [out, in]."""

    def __init__(self, args: DenseArgs):
        super().__init__()
        self.linear = nn.Linear(args.in_features, args.out_features, bias=args.bias)
        self.activation = args.activation_function

    def __call__(self, x: mx.array) -> mx.array:
        return ACTIVATIONS[self.activation](self.linear(x))


def bidirectional_mask(padding_mask: mx.array, band: int | None) -> mx.array:
    """Bool [B, 1, T, T]: each query sees every real key, within |q - k| < band if given.

    As transformers' Gemma3TextModel with use_bidirectional_attention (an all-true
    or_mask for global layers, `abs(q_idx - kv_idx) < sliding_window` for sliding ones),
    narrowed by padding.  A query also sees itself, so a padding row is never all-masked
    (a NaN there would not be pooled, but would poison nothing else either way).
    """
    T = padding_mask.shape[1]
    q, k = mx.arange(T)[:, None], mx.arange(T)[None, :]
    allowed = padding_mask[:, None, None, :]
    if band is not None:
        allowed = allowed & (mx.abs(q - k) < band)[None, None]
    return allowed | (q == k)[None, None]


def l2_normalize(x: mx.array) -> mx.array:
    """x / max(||x||, 1e-12) along the last axis, as torch.nn.functional.normalize."""
    norm = mx.sqrt(mx.sum(x.astype(mx.float32) ** 2, axis=-1, keepdims=True))
    return (x.astype(mx.float32) / mx.maximum(norm, 1e-12)).astype(x.dtype)


class Model(nn.Module):
    """Token ids [B, T] + padding mask -> sentence embeddings [B, dimensions]."""

    # The converter's -q leaves the Dense projections float: they are under 2% of the weights, their
    # error reaches every output vector directly, and sentence-transformers' Dense module
    # format (`linear.weight`) has no quantized form, so its subfolders stay readable.
    float_prefixes = ("dense.",)
    image_input = None  # text only
    audio_input = None

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.path = None  # set by the loader to the folder it read
        self.image_input = None  # text only; read by the tuner's refusal of encoders
        self.audio_input = None  # no audio tower (read by the converter, as for every model)
        self.embedding_settings = None  # set by the loader: prompts, special tokens, length (embedding_folder.py)
        self.model = DecoderStack(args.text, gemma3.TransformerBlock)  # weights `model.*`
        self.dense = [Dense(d) for d in args.dense]

    @property
    def layers(self) -> list:
        """The encoder blocks, first to last (the quantization recipes count them)."""
        return self.model.layers

    def hidden_states(self, input_ids: mx.array, padding_mask: mx.array) -> mx.array:
        """The backbone's last hidden state [B, T, hidden] (transformers' last_hidden_state)."""
        stack = self.model
        h = stack.embed(input_ids)
        masks = {}  # layers with the same band share one mask
        for layer in stack.layers:
            if layer.window not in masks:
                masks[layer.window] = bidirectional_mask(padding_mask, layer.window)
            h = layer(h, masks[layer.window])
        return stack.norm(h)

    def __call__(self, input_ids: mx.array, padding_mask: mx.array | None = None) -> mx.array:
        if padding_mask is None:
            padding_mask = mx.ones(input_ids.shape, dtype=mx.bool_)
        h = self.hidden_states(input_ids, padding_mask)
        # Mean pooling summed in float32 (sentence-transformers' Pooling accumulates half
        # types in float32), the count clamped at 1e-9 as it does.
        weights = padding_mask[..., None].astype(mx.float32)
        summed = mx.sum(h.astype(mx.float32) * weights, axis=1)
        x = (summed / mx.maximum(mx.sum(weights, axis=1), 1e-9)).astype(h.dtype)
        for layer in self.dense:
            x = layer(x)
        return l2_normalize(x) if self.args.normalize else x

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Gemma3TextModel saves its weights without the `model.` prefix; HF's `Gemma3Model`
        wrappers and mlx folders with it.  The Dense weights arrive as `dense.<i>.linear.*`."""
        out = {}
        for name, w in weights.items():
            if name.endswith("rotary_emb.inv_freq"):
                continue
            if not name.startswith(("model.", "dense.")):
                name = "model." + name
            elif name.startswith("dense.") and ".linear." not in name:  # mlx-embeddings: `dense.0.weight`
                index, rest = name[len("dense."):].split(".", 1)
                name = f"dense.{index}.linear.{rest}"
            out[name] = w
        return out
