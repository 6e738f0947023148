"""`GemmaBackbone`: keras-hub's backbone interface over an mlx_gemma model.

Built from keras-hub's arguments it makes a randomly initialised Gemma (or, with
post norms, Gemma 2) model of that shape; `from_preset` loads real weights; any
loaded mlx_gemma text model (Gemma 3 included) can be wrapped with `from_model`.
The MLX module is `backbone.model`; calling the backbone gives keras-hub's
output, the final-normed hidden states.
"""

from __future__ import annotations

import os
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from ..convert.checkpoint import DTYPES
from ..convert.keras_common import keras_config_to_hf
from ..arguments import integer_arg, is_integer, real_arg
from ..errors import MlxGemmaError
from ..loading import build_model, load_config, load_model
from ..models import gemma3_vlm
from .presets import is_keras_preset, keras_backbone_config, preset_of, resolve_preset
from .causal_lm_training import enable_lora, load_lora_weights, save_lora_weights


def as_dtype(dtype) -> mx.Dtype | None:
    """None, an mx.Dtype, or its name (as keras-hub's `dtype=` takes)."""
    if dtype is None or isinstance(dtype, mx.Dtype):
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise MlxGemmaError(f"dtype must be one of {', '.join(DTYPES)} (or an mx.Dtype), got {dtype!r}")


def random_model(config: dict, dtype=None):
    """A model of `config`'s shape with random weights, in `dtype` (float32 by default, keras'), for inference."""
    model = build_model(config)
    model.set_dtype(as_dtype(dtype) or mx.float32)
    model.eval()
    return model


class GemmaBackbone:
    """keras_hub.models.GemmaBackbone's constructor, on MLX, with random weights.

    Arguments as keras-hub 0.32's (`intermediate_dim` is twice Hugging Face's
    `intermediate_size`; post norms + soft-caps + sliding window make Gemma 2).
    Also accepted, from keras-nlp's older examples: `num_heads` (query heads, and
    key/value heads unless given; `head_dim` defaults to hidden_dim / num_heads)
    and `max_sequence_length` (the context length; keras-hub's presets record
    none, so the default is 8192 as in mlx_gemma.convert.keras).  `dropout` is kept
    for training; inference never drops.  `dtype` defaults to float32, keras'
    default policy.
    """

    def __init__(self, vocabulary_size: int, num_layers: int, num_query_heads: int | None = None,
                 num_key_value_heads: int | None = None, hidden_dim: int | None = None,
                 intermediate_dim: int | None = None, head_dim: int | None = None,
                 query_head_dim_normalize: bool = True, use_post_ffw_norm: bool = False,
                 use_post_attention_norm: bool = False, attention_logit_soft_cap: float | None = None,
                 final_logit_soft_cap: float | None = None, use_sliding_window_attention: bool = False,
                 sliding_window_size: int = 4096, layer_norm_epsilon: float = 1e-6, dropout: float = 0.0,
                 dtype=None, *, num_heads: int | None = None, max_sequence_length: int | None = None):
        num_query_heads = num_query_heads if num_query_heads is not None else num_heads
        if num_query_heads is None or hidden_dim is None or intermediate_dim is None:
            raise MlxGemmaError("GemmaBackbone needs num_query_heads (or num_heads), hidden_dim and intermediate_dim")
        if num_key_value_heads is None:
            num_key_value_heads = num_query_heads
        if head_dim is None:
            if not is_integer(hidden_dim) or not is_integer(num_query_heads) or \
                    num_query_heads <= 0 or hidden_dim % num_query_heads:
                raise MlxGemmaError(f"head_dim not given and hidden_dim ({hidden_dim}) is not a multiple of "
                                    f"the number of heads ({num_query_heads})")
            head_dim = hidden_dim // num_query_heads
        real_arg("dropout", dropout, 0, below=1)
        keras_config = dict(
            vocabulary_size=vocabulary_size, num_layers=num_layers, num_query_heads=num_query_heads,
            num_key_value_heads=num_key_value_heads, hidden_dim=hidden_dim, intermediate_dim=intermediate_dim,
            head_dim=head_dim, query_head_dim_normalize=query_head_dim_normalize,
            use_post_ffw_norm=use_post_ffw_norm, use_post_attention_norm=use_post_attention_norm,
            attention_logit_soft_cap=attention_logit_soft_cap, final_logit_soft_cap=final_logit_soft_cap,
            use_sliding_window_attention=use_sliding_window_attention, sliding_window_size=sliding_window_size,
            layer_norm_epsilon=layer_norm_epsilon)
        config = keras_config_to_hf(keras_config)  # validates, and raises typed errors naming the argument
        if max_sequence_length is not None:
            config["max_position_embeddings"] = integer_arg("max_sequence_length", max_sequence_length, 1)
        model = build_model(config)
        model.set_dtype(as_dtype(dtype) or mx.float32)
        model.eval()
        self._init(model, dropout)
        self._arguments = {**keras_config, "dropout": dropout}

    def _init(self, model, dropout: float = 0.0) -> None:
        self.model = model
        self.dropout = dropout
        self._arguments: dict | None = None  # the constructor's keras-hub arguments, when built from them
        self.lora_config: dict | None = None  # set by enable_lora (see causal_lm_training.py)

    # ----- LoRA, keras-hub's names (mlx_gemma/tuner/lora.py does the work; see causal_lm_training.py)

    def enable_lora(self, rank: int, target_layer_names=None, **settings) -> None:
        """Freeze the backbone; adapters on the query and value projections unless named
        (keras-hub's "query", "value", "key", "attention_output", "ffw_gating", "ffw_gating_2",
        "ffw_linear", or ours, "q_proj", ...).  `settings`: alpha, dropout, num_layers, dora."""
        enable_lora(self, rank, target_layer_names, **settings)

    def save_lora_weights(self, path) -> None:
        """Write the adapters to folder `path` (adapters.safetensors + adapter_config.json, mlx-lm's layout)."""
        save_lora_weights(self, path)

    def load_lora_weights(self, path) -> None:
        load_lora_weights(self, path)

    @classmethod
    def from_model(cls, model, dropout: float = 0.0) -> GemmaBackbone:
        """Wrap an already loaded mlx_gemma text model (e.g. from `mlx_gemma.load`); of a Gemma 3
        vision-language model, its language half (as keras-hub's `gemma3_4b_text` presets are)."""
        if isinstance(model, gemma3_vlm.Model):
            model = model.text_model()
        backbone = cls.__new__(cls)
        backbone._init(model, dropout)
        return backbone

    @classmethod
    def from_preset(cls, preset: str | os.PathLike, load_weights: bool = True, dtype=None) -> GemmaBackbone:
        """A preset name, hf:// or kaggle:// handle, or folder (see mlx_gemma.tasks.presets).

        `load_weights=False` gives random weights of a named preset's shape without
        downloading them (for a folder: of its config's shape).
        """
        preset_entry = preset_of(preset)
        if load_weights:
            return cls.from_model(load_model(resolve_preset(preset), dtype=as_dtype(dtype)))
        if preset_entry is not None and preset_entry.backbone:
            return cls(**preset_entry.backbone, dtype=dtype)
        if isinstance(preset, (str, os.PathLike)) and Path(preset).expanduser().is_dir() \
                and is_keras_preset(Path(preset).expanduser()):  # build from its arguments: no conversion
            return cls(**keras_backbone_config(Path(preset).expanduser()), dtype=dtype)
        if preset_entry is not None:
            if preset_entry.hf_config is None:
                raise MlxGemmaError(f"{preset}: its shape is not recorded (only its Keras preset can be used)")
            return cls.from_model(random_model(preset_entry.hf_config, dtype))
        return cls.from_model(random_model(load_config(resolve_preset(preset)), dtype))

    # ----- keras-hub's attributes, read from the model's config -------------------------

    @property
    def args(self):
        return self.model.args

    vocabulary_size = property(lambda self: self.args.vocab_size)
    num_layers = property(lambda self: self.args.num_hidden_layers)
    num_query_heads = property(lambda self: self.args.num_attention_heads)
    num_key_value_heads = property(lambda self: self.args.num_key_value_heads)
    hidden_dim = property(lambda self: self.args.hidden_size)
    intermediate_dim = property(lambda self: 2 * self.args.intermediate_size)  # keras-hub's convention
    head_dim = property(lambda self: self.args.head_dim)
    layer_norm_epsilon = property(lambda self: self.args.rms_norm_eps)
    attention_logit_soft_cap = property(lambda self: self.args.attn_logit_softcapping)
    final_logit_soft_cap = property(lambda self: self.args.final_logit_softcapping)
    use_post_ffw_norm = use_post_attention_norm = property(lambda self: self.args.model_type != "gemma")
    use_sliding_window_attention = property(lambda self: any(w is not None for w in self.model.windows))
    # Gemma 1 has no window; keras-hub still records its default 4096 there.
    sliding_window_size = property(lambda self: getattr(self.args, "sliding_window", 4096))
    max_sequence_length = property(lambda self: self.args.max_position_embeddings)
    query_head_dim_normalize = property(
        lambda self: getattr(self.args, "query_pre_attn_scalar", self.args.head_dim) == self.args.head_dim)
    # The layers, by keras-hub's names.
    token_embedding = property(lambda self: self.model.model.embed_tokens)
    transformer_layers = property(lambda self: self.model.layers)
    layer_norm = property(lambda self: self.model.model.norm)

    @property
    def dtype(self) -> mx.Dtype:
        return self.token_embedding.weight.dtype

    def get_config(self) -> dict:
        names = ("vocabulary_size", "num_layers", "num_query_heads", "num_key_value_heads", "hidden_dim",
                 "intermediate_dim", "head_dim", "query_head_dim_normalize", "use_post_ffw_norm",
                 "use_post_attention_norm", "attention_logit_soft_cap", "final_logit_soft_cap",
                 "use_sliding_window_attention", "sliding_window_size", "layer_norm_epsilon", "dropout")
        # Constructor arguments win: e.g. query_head_dim_normalize=False with hidden / heads ==
        # head_dim builds the same network as True, but keras-hub records what was asked.
        return {**{name: getattr(self, name) for name in names}, **(self._arguments or {})}

    def count_params(self) -> int:
        # Shapes only: nothing is evaluated, so this is free even for unrealised random weights.
        return sum(v.size for _, v in tree_flatten(self.model.parameters()))

    def __call__(self, inputs: dict) -> mx.array:
        """{"token_ids": [B, T], "padding_mask": [B, T]} -> final-normed hidden states [B, T, hidden]."""
        if not isinstance(inputs, dict) or "token_ids" not in inputs:
            raise MlxGemmaError("GemmaBackbone takes a dict with 'token_ids' (and optionally 'padding_mask')")
        ids = mx.array(inputs["token_ids"]).astype(mx.int32)
        mask = inputs.get("padding_mask")
        mask = None if mask is None else mx.array(mask).astype(mx.bool_)
        return self.model.model(ids, padding_mask=mask)
