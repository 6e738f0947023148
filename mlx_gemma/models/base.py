"""The model contract: what the rest of mlx_gemma may use of a model, its config and its blocks.

The engine, generate, score, train, lora, the converter and the tasks reach a model only
through `GemmaModel`; the shared decoder stack (decoder.py) reaches a block only through
`Block`.  Every class in the registry (models/__init__.py) sets each field itself, so callers
read them directly and never probe with getattr; tests/test_models.py checks every registered
architecture against these lists.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import mlx.core as mx
import mlx.nn as nn

from .kv_cache import KVCacheOptions


@dataclass(frozen=True)
class ImageInput:
    """What one image takes in a prompt (PaliGemma, Gemma 3, Gemma 4): its pixels and its placeholder tokens."""

    image_size: int  # pixels per side of the square input the vision tower takes; 0: any size (Gemma 4)
    num_tokens: int  # placeholders per image: one per patch (PaliGemma), per pooled soft token (Gemma 3);
    # with `variable`, the most one image may take (its budget)
    token_id: int  # the placeholder's id, which the image features replace
    start_id: int | None = None  # `<start_of_image>` before the placeholders (Gemma 3); None: PaliGemma's layout
    end_id: int | None = None  # `<end_of_image>` after them (Gemma 3)
    # Gemma 4: each image is resized within the budget and takes its own number of soft tokens; its
    # pixels come as flat patches with their grid positions (mlx_gemma.gemma4_images), not as a square.
    variable: bool = False


@dataclass(frozen=True)
class AudioInput:
    """What one audio clip takes in a prompt (Gemma 4 E2B / E4B): `start_id`, one `token_id` per
    40 ms soft token (mlx_gemma.audio.num_soft_tokens), `end_id`."""

    token_id: int  # the placeholder's id (`<|audio|>`), which the audio features replace
    start_id: int  # `<|audio>` before the placeholders
    end_id: int  # `<audio|>` after them


@dataclass(frozen=True)
class RankShare:
    """What one process holds of a model run across ranks (mlx_gemma.distributed); a whole model's `share` is None."""

    strategy: str  # "pipeline": a range of the layers; "tensor": a slice of every layer
    rank: int
    size: int  # ranks in the group
    # Whether any rank holds quantized linear layers: every rank picks the prefill chunk from this
    # (engine.default_prefill_step), so all feed the same chunks, whatever their own share holds.
    quantized: bool

    @property
    def hidden_states(self) -> bool:
        """Whether `model.model(...)` gives the final hidden states here.  A pipeline of several ranks
        gives each rank its stage's output (the normed states exist on the last rank only), so what
        reads hidden states beyond the head (contrastive search, score) refuses it, on every rank."""
        return self.strategy != "pipeline" or self.size == 1


@runtime_checkable
class GemmaArgs(Protocol):
    """The config fields callers read from `model.args`, whatever the architecture.

    Architecture-specific fields (Gemma 2's `sliding_window`, PaliGemma's `vision`) are read
    only by code that knows the architecture (its own model file, the keras-style backbones).
    """

    model_type: str  # as config.json names the architecture
    vocab_size: int  # rows of the embedding = width of the logits
    hidden_size: int  # width of the residual stream
    head_dim: int  # width of one attention head (the KV cache's last axis)
    max_position_embeddings: int  # context length: prompt + generated tokens
    tie_word_embeddings: bool  # the output projection is the embedding (no lm_head weight)
    attn_logit_softcapping: float | None  # cap on attention scores (Gemma 2); None: uncapped
    final_logit_softcapping: float | None  # cap on output logits (Gemma 2); None: uncapped


@runtime_checkable
class Block(Protocol):
    """One decoder block, as the shared stack runs it."""

    window: int | None  # positions its attention sees (self included); None: all of them

    def __call__(self, x: mx.array, mask: Any, cache: Any = None) -> mx.array:
        """[B, T, hidden] -> [B, T, hidden]; `mask` is the stack's mask for this block's window."""


@runtime_checkable
class GemmaModel(Protocol):
    """A loaded model, as generation, scoring, training, conversion and the tasks use it."""

    args: GemmaArgs  # the parsed config.json (the architecture's ModelArgs)
    model_type: str  # the registry key that built it: "gemma", "gemma2", "gemma3_text", "paligemma"
    model: nn.Module  # ids (+ inputs) -> normed last hidden [B, T, hidden]: model.model(ids, cache=..., **inputs);
    # with images, also model.model.embed(ids, pixel_values) -> the merged embeddings [B, T, hidden]
    # (Gemma 4: embed(ids, pixel_values, image_positions, audio_features, audio_mask))
    prefix_lm: bool  # the prompt attends both ways, so it is prefilled in one call (PaliGemma)
    float_prefixes: tuple[str, ...]  # weight-name prefixes the converter leaves unquantized
    image_input: ImageInput | None  # what an image takes in a prompt; None: a text-only model
    audio_input: AudioInput | None  # what an audio clip takes in a prompt; None: no audio tower
    path: Path | None  # the folder `load` read it from; None when built in memory
    share: RankShare | None  # one rank's share of a distributed model (mlx_gemma.distributed); None: the whole model

    def __call__(self, input_ids: mx.array, **inputs: Any) -> mx.array:
        """Logits [B, T, vocab] for ids [B, T]: `logits(model(ids, **inputs))`; pass `cache=` by keyword
        (PaliGemma takes `pixel_values` second)."""

    def logits(self, hidden: mx.array) -> mx.array:
        """The output head on hidden states [..., hidden] -> [..., vocab], final soft-cap included."""

    @property
    def decoder(self) -> nn.Module:
        """The Gemma text stack (decoder.DecoderStack; gemma4.Gemma4Stack for Gemma 4): embed_tokens, layers, norm."""

    @property
    def layers(self) -> list[Block]:
        """The decoder blocks, first to last (LoRA and checkpointing wrap them)."""

    @property
    def windows(self) -> list[int | None]:
        """Each block's attention window, in order; the caches are shaped by it."""

    def make_cache(self, left_padding: mx.array | None = None, options: KVCacheOptions | None = None,
                   **kv: Any) -> list:
        """One KV cache per block, shaped by a `KVCacheOptions` (or its fields as keywords)."""

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """A checkpoint's weights under this model's names, minus what it recomputes or shares."""
