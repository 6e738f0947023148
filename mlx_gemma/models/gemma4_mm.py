"""Gemma 4 with images and audio (`model_type: "gemma4"` with a `vision_config` and/or an
`audio_config`; transformers 5.25's `Gemma4ForConditionalGeneration`).

The Gemma 4 text stack (gemma4.py) with the vision tower (gemma4_vision.py) and the audio tower
(gemma4_audio.py), each followed by its embedder into the text width.  A prompt holds, per image,
`<|image>`, one `<|image|>` per soft token (each image its own count: mlx_gemma.gemma4_images) and
`<image|>`; per audio clip `<|audio>`, one `<|audio|>` per 40 ms soft token, `<audio|>`.  The
features replace the placeholders' embeddings unscaled, in order (transformers' `masked_scatter`);
the placeholders themselves are embedded as the pad id, which the per-layer inputs also read
(Gemma4Model.forward).  With `use_bidirectional_attention: "vision"` (26B / 31B) each image's soft
tokens see each other on sliding layers; global layers stay causal (create_masks_for_vision_model).
Audio tokens are causal.

Without media this is exactly the Gemma 4 text model.  Weight names: Hugging Face's
(`model.language_model.*`, `model.vision_tower.*`, `model.embed_vision.*`, `model.audio_tower.*`,
`model.embed_audio.*`); `sanitize` also takes mlx-vlm 0.7.10's (`language_model.model.*`,
`vision_tower.*`, `embed_vision.*`, `audio_tower.*`, `embed_audio.*`) and either library's experts
(switch_glu halves).  The converter writes the experts as switch_glu halves and per-layer quantization
under mlx-vlm's module paths (`mlx_vlm_quantization`), so mlx-vlm loads the folder and mlx-lm its text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ..arguments import is_integer
from ..errors import AudioError, ConfigError, ImageError
from ..json_input import json_type
from . import gemma4
from .base import AudioInput, ImageInput
from .config import parse_config
from .gemma4_audio import AudioArgs, AudioEmbedder, AudioModel
from .gemma4_vision import Gemma4VisionArgs, Gemma4VisionModel, MultimodalEmbedder
from .image_blocks import image_block_ids
from .kv_cache import KVCacheOptions, make_layer_caches
from .layers import softcap
from .moe import sanitize_experts, to_mlx_lm_quantization

# transformers' Gemma4Config spells the end-of-audio id `eoa_token_index`; a config may say `eoa_token_id`.
ALIASES = {"eoa_token_id": "eoa_token_index"}
# The most soft tokens one image may take when no processor file says (Gemma4ImageProcessor's default).
DEFAULT_IMAGE_BUDGET = 280


@dataclass
class ModelArgs:
    text_config: dict[str, Any] = field(default_factory=dict)  # the language model's settings (gemma4_text)
    vision_config: dict[str, Any] | None = None  # the vision tower's (gemma4_vision); None: no images
    audio_config: dict[str, Any] | None = None  # the audio tower's (gemma4_audio); None: no audio (26B, 31B)
    model_type: str = "gemma4"  # as config.json names the architecture
    image_token_id: int = 258_880  # `<|image|>`: an image soft token's placeholder
    boi_token_id: int = 255_999  # `<|image>`, before an image's placeholders
    eoi_token_id: int = 258_882  # `<image|>`, after them
    video_token_id: int = 258_884  # `<|video|>`: a video frame's placeholder (embedded as pad; no video here)
    audio_token_id: int = 258_881  # `<|audio|>`: an audio soft token's placeholder
    boa_token_id: int = 256_000  # `<|audio>`, before a clip's placeholders
    eoa_token_index: int = 258_883  # `<audio|>`, after them
    tie_word_embeddings: bool | None = None  # None: as text_config says (default True, no lm_head)
    initializer_range: float | None = None  # training only; kept so that it is not reported as unknown
    extra: dict[str, Any] = field(default_factory=dict)  # keys we keep but do not interpret

    @classmethod
    def from_dict(cls, config: dict, path=None, where: str = "") -> "ModelArgs":
        if not isinstance(config, dict) or not isinstance(config.get("text_config"), dict):
            raise ConfigError(path, f"a gemma4 multimodal config needs a text_config object, got "
                                    f"{json_type(config.get('text_config') if isinstance(config, dict) else config)}")
        args = parse_config(cls, config, path, where)
        for alias, name in ALIASES.items():
            if alias in args.extra and name not in config:
                setattr(args, name, args.extra[alias])
        if args.tie_word_embeddings is None:
            args.tie_word_embeddings = bool(args.text_config.get("tie_word_embeddings", True))
        text = {**args.text_config, "model_type": "gemma4_text", "tie_word_embeddings": args.tie_word_embeddings}
        # Set after construction, not dataclass fields: parse_config must never fill them.
        args.text = gemma4.ModelArgs.from_dict(text, path, "text_config.")
        args.vision = None if args.vision_config is None else Gemma4VisionArgs.from_dict(args.vision_config, path)
        args.audio = None if args.audio_config is None else AudioArgs.from_dict(args.audio_config, path)
        args.check(path)
        return args

    def check(self, path) -> None:
        """Refuse ids the model could not use, and a config with neither tower."""
        if self.vision is None and self.audio is None:
            raise ConfigError(path, "a gemma4 multimodal config needs a vision_config or an audio_config")
        for name in ("image_token_id", "boi_token_id", "eoi_token_id", "video_token_id", "audio_token_id",
                     "boa_token_id", "eoa_token_index"):
            v = getattr(self, name)
            if not is_integer(v) or not 0 <= v < 1 << 31:
                raise ConfigError(path, f"{name} must be a non-negative integer, got {v!r:.80}")
        pad = self.pad_token_id
        if not is_integer(pad) or not 0 <= pad < self.text.vocab_size:
            raise ConfigError(path, f"text_config.pad_token_id must be an id below vocab_size "
                                    f"{self.text.vocab_size} (media placeholders are embedded as it), got {pad!r:.80}")

    @property
    def pad_token_id(self) -> int:
        return self.text.extra.get("pad_token_id", 0)  # Gemma4TextConfig's default

    # The contract's fields (base.GemmaArgs) that belong to the decoder, delegated to it.
    vocab_size = property(lambda self: self.text.vocab_size)
    max_position_embeddings = property(lambda self: self.text.max_position_embeddings)
    hidden_size = property(lambda self: self.text.hidden_size)
    head_dim = property(lambda self: self.text.head_dim)
    num_key_value_heads = property(lambda self: self.text.num_key_value_heads)  # a prompt cache's shape
    attn_logit_softcapping = property(lambda self: self.text.attn_logit_softcapping)
    final_logit_softcapping = property(lambda self: self.text.final_logit_softcapping)


def scatter_features(h: mx.array, slots: mx.array, features: mx.array, error, what: str) -> mx.array:
    """Embeddings h [B, T, D] with the k-th True of `slots` [B, T] (row-major over the batch) taking
    features[k] ([N, D]), as transformers' `masked_scatter`; a count that differs is `error(what, ...)`."""
    n_slots = int(slots.sum().item())
    if n_slots != features.shape[0]:
        raise error(what, f"{features.shape[0]} soft tokens from the {what} but the prompt holds {n_slots} "
                          "placeholders for them (one placeholder per soft token, per clip or image)")
    flat = slots.reshape(-1)
    index = mx.maximum(mx.cumsum(flat.astype(mx.int32)) - 1, 0)
    D = h.shape[-1]
    merged = mx.where(flat[:, None], features.astype(h.dtype)[index], h.reshape(-1, D))
    return merged.reshape(h.shape)


class Gemma4MMModel(nn.Module):
    """Token ids (+ image patches, + audio features) -> the decoder's normed last hidden state [B, T, hidden].

    An image's soft tokens attend to each other within one call: a caller that feeds a prompt in
    chunks keeps each image in one chunk (engine.prefill does).
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.language_model = gemma4.Gemma4Stack(args.text)
        if args.vision is not None:
            self.vision_tower = Gemma4VisionModel(args.vision)
            self.embed_vision = MultimodalEmbedder(args.vision.hidden_size, args.text.hidden_size,
                                                   args.vision.rms_norm_eps)
        if args.audio is not None:
            self.audio_tower = AudioModel(args.audio)
            self.embed_audio = AudioEmbedder(args.audio, args.text.hidden_size)

    def media_slots(self, input_ids: mx.array) -> mx.array:
        """bool [B, T]: the image, video and audio placeholders (transformers' multimodal mask)."""
        a = self.args
        return (input_ids == a.image_token_id) | (input_ids == a.video_token_id) | (input_ids == a.audio_token_id)

    def text_ids(self, input_ids: mx.array) -> mx.array:
        """The ids with every placeholder replaced by the pad id, as Gemma4Model embeds them (the
        placeholders may lie past the vocabulary) and as its per-layer inputs read them."""
        return mx.where(self.media_slots(input_ids), self.args.pad_token_id, input_ids)

    def image_features(self, pixel_values: mx.array, image_positions: mx.array) -> mx.array:
        """Patches [N, P, 3 p^2] and positions [N, P, 2] -> every image's soft tokens [total, hidden]."""
        if "vision_tower" not in self:
            raise ImageError("image", "this Gemma 4 checkpoint has no vision tower (no vision_config)")
        if image_positions is None:
            raise ImageError("image_positions", "Gemma 4 images need their patch positions beside the pixels")
        return self.embed_vision(self.vision_tower(pixel_values, image_positions))

    def audio_features(self, features: mx.array, mask: mx.array | None) -> mx.array:
        """Log-mel features [N, T, mels] and their mask [N, T] -> every clip's valid soft tokens [total, hidden]."""
        if "audio_tower" not in self:
            raise AudioError("audio", "this Gemma 4 checkpoint has no audio tower (no audio_config): it takes no audio")
        tokens, valid = self.audio_tower(features, mask)  # [N, T', D], [N, T']
        embedded = self.embed_audio(tokens).reshape(-1, self.args.text.hidden_size)
        return embedded[_true_rows(valid)]  # padding frames' tokens dropped (Gemma4Model.forward)

    def embed(self, input_ids: mx.array, pixel_values: mx.array | None = None, image_positions: mx.array | None = None,
              audio_features: mx.array | None = None, audio_mask: mx.array | None = None) -> mx.array:
        """Scaled token embeddings [B, T, hidden] with the image features at the `<|image|>` positions and
        the audio features at the `<|audio|>` positions (unscaled: transformers scales inside the
        embedding layer and scatters the features in after).  A prompt (T > 1) with placeholders
        needs their media; one generated token is embedded as the pad id, as transformers does."""
        h = self.language_model.embed(self.text_ids(input_ids))
        prompt = input_ids.shape[1] > 1
        if pixel_values is not None:
            features = self.image_features(pixel_values, image_positions)
            h = scatter_features(h, input_ids == self.args.image_token_id, features, ImageError, "image")
        elif prompt and (input_ids == self.args.image_token_id).any().item():
            raise ImageError("image", "input_ids hold <|image|> placeholders but no images were given")
        if audio_features is not None:
            features = self.audio_features(audio_features, audio_mask)
            h = scatter_features(h, input_ids == self.args.audio_token_id, features, AudioError, "audio")
        elif prompt and (input_ids == self.args.audio_token_id).any().item():
            raise AudioError("audio", "input_ids hold <|audio|> placeholders but no audio was given")
        return h

    def __call__(
        self,
        input_ids: mx.array,  # [B, T], with placeholders where the media go
        cache=None,
        padding_mask: mx.array | None = None,  # bool [B, T], True = real token; no cache
        pixel_values: mx.array | None = None,  # [N, P, 3 p^2] in [0, 1]: every image's patches, in prompt order
        image_positions: mx.array | None = None,  # [N, P, 2] patch (x, y), (-1, -1) for padding
        audio_features: mx.array | None = None,  # [N, T, mels] log-mel features, clip after clip
        audio_mask: mx.array | None = None,  # [N, T] True for real frames
        input_embeddings: mx.array | None = None,  # [B, T, hidden] from `embed` (a prefill chunk's slice)
        intercept=None,  # as Gemma4Stack's
    ) -> mx.array:
        blocks = None
        if self.args.text.use_bidirectional_attention == "vision" and input_ids.shape[1] > 1:
            is_image = (input_ids == self.args.image_token_id) | (input_ids == self.args.video_token_id)
            if is_image.any().item():
                blocks = image_block_ids(is_image)
        if input_embeddings is None:
            input_embeddings = self.embed(input_ids, pixel_values, image_positions, audio_features, audio_mask)
        return self.language_model(self.text_ids(input_ids), cache, padding_mask=padding_mask,
                                   input_embeddings=input_embeddings, intercept=intercept, image_blocks=blocks)


def _true_rows(mask: mx.array) -> mx.array:
    """The flat indices of the True entries of `mask` (MLX has no boolean indexing)."""
    flat = mask.reshape(-1).tolist()
    return mx.array([i for i, v in enumerate(flat) if v], dtype=mx.int32)


class Model(nn.Module):
    """Gemma 4 with images and audio: `model(ids, cache=None, pixel_values=..., image_positions=...,
    audio_features=..., audio_mask=...) -> logits` (the contract: base.GemmaModel).

    Causal: a prompt may be prefilled in chunks; the engine keeps each image's soft tokens in one
    chunk (engine.prefill), so chunked prefill and cached decoding give what one full call gives.
    """

    prefix_lm = False  # causal throughout; image blocks are kept whole by the engine instead
    share = None  # the whole model in this process (base.GemmaModel; mlx_gemma.distributed sets a rank's)

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type: str = args.model_type
        self.path = None  # set by `loading.load_model` to the folder it read
        self.model = Gemma4MMModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.text.hidden_size, args.text.vocab_size, bias=False)
        self.image_input = None if args.vision is None else ImageInput(
            0, DEFAULT_IMAGE_BUDGET, args.image_token_id, start_id=args.boi_token_id, end_id=args.eoi_token_id,
            variable=True)
        self.audio_input = None if args.audio is None else AudioInput(args.audio_token_id, args.boa_token_id,
                                                                      args.eoa_token_index)
        # The converter quantizes the language model only: the towers and their embedders stay float
        # (their rounding error would reach every soft token; they are a small share of the weights).
        self.float_prefixes = tuple(f"model.{name}." for name, tower in (
            ("vision_tower", args.vision), ("embed_vision", args.vision), ("audio_tower", args.audio),
            ("embed_audio", args.audio)) if tower is not None)

    def __call__(self, input_ids: mx.array, cache=None, **inputs) -> mx.array:
        return self.logits(self.model(input_ids, cache, **inputs))

    def logits(self, hidden: mx.array) -> mx.array:
        """Output logits for hidden states [..., hidden] (final soft-cap included)."""
        stack = self.model.language_model
        out = stack.embed_tokens.as_linear(hidden) if self.args.tie_word_embeddings else self.lm_head(hidden)
        return softcap(out, self.args.final_logit_softcapping)

    @property
    def decoder(self) -> gemma4.Gemma4Stack:
        return self.model.language_model

    @property
    def layers(self) -> list[gemma4.DecoderLayer]:
        return self.model.language_model.layers

    @property
    def windows(self) -> list[int | None]:
        return [layer.window for layer in self.layers]

    def make_cache(self, left_padding: mx.array | None = None, options: KVCacheOptions | None = None, **kv):
        """Per-layer KV caches, as the text model's (KV-shared layers hold nothing)."""
        text = self.args.text
        shapes = [text.layer_shape(i) for i in range(len(self.layers))]
        return make_layer_caches(self.windows, left_padding, KVCacheOptions.of(options, **kv),
                                 shared_from=text.kv_sources(), kv_shapes=shapes)

    def text_model(self) -> gemma4.Model:
        """The language half as a Gemma 4 text model sharing these weights (no copy)."""
        text = gemma4.Model(self.args.text)  # its fresh random weights stay lazy: replaced before use
        text.model = self.model.language_model
        if not self.args.tie_word_embeddings:
            text.lm_head = self.lm_head
        text.path = self.path
        return text

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Hugging Face's or mlx-vlm's names -> ours: the text half as gemma4.Model names it (under
        `model.language_model.`), the towers of this config (others dropped) with their own fixes."""
        towers, text = {}, {}
        for key, value in weights.items():
            name = key.removeprefix("model.")
            tower = name.split(".", 1)[0]
            if tower in _TOWERS:
                if _TOWERS[tower] in self.model:  # a tower this config has
                    towers["model." + name] = value
            else:
                text[key] = value
        out = {}
        text = sanitize_experts(text)  # expert halves joined first, so a missing one is named as the file names it
        for key, value in self.text_model().sanitize(text).items():
            out["model.language_model." + key[len("model."):] if key.startswith("model.") else key] = value
        if "vision_tower" in self.model:
            towers = self.model.vision_tower.sanitize(towers, prefix="model.vision_tower.")
        if "audio_tower" in self.model:
            towers = self.model.audio_tower.sanitize(towers, prefix="model.audio_tower.")
        return {**out, **towers}


# A tower's (or embedder's) first name -> the tower that must exist for its weights to load.
_TOWERS = {"vision_tower": "vision_tower", "embed_vision": "vision_tower", "audio_tower": "audio_tower",
           "embed_audio": "audio_tower"}


# Our module paths -> mlx-vlm 0.7.10's (its gemma4.py `sanitize` drops `model.` and puts the text under
# `language_model.model.`; mlx-lm 0.32's gemma4.py reads the text's the same way).
_MLX_VLM_PREFIXES = (("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head.")) \
    + tuple((f"model.{name}.", f"{name}.") for name in _TOWERS)


def mlx_vlm_quantization(quantization: dict) -> dict:
    """A `quantization` entry with our per-layer keys under mlx-vlm's module paths, the experts as its
    switch_glu halves (moe.to_mlx_lm_quantization), so mlx-vlm and mlx-lm load a folder we write with
    each layer's own settings; gemma4.readable_quantization reads them back."""
    out = {}
    for name, value in quantization.items():  # module paths: matched with a trailing dot
        old, new = next(((o, n) for o, n in _MLX_VLM_PREFIXES if f"{name}.".startswith(o)), ("", ""))
        out[(new + f"{name}."[len(old):])[:-1]] = value
    return to_mlx_lm_quantization(out)
