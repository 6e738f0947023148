"""What the image-and-text wrappers share: image features put in place of their placeholder
tokens, and the attention of an image's tokens to each other (Gemma 3's image blocks).

An *image block* is a run of consecutive image placeholder tokens in one row: the soft
tokens of one image.  Gemma 3 lets every token of a block see the whole block (later
tokens of the same image included), never a later image (Google's `gemma` package,
gm/utils/_attention_mask.py; transformers 5's `token_type_ids` mask).
"""

from __future__ import annotations

import mlx.core as mx

from ..errors import ImageError


def embed_with_images(stack, input_ids: mx.array, image_id: int, image_features, pixel_values, token: str) -> mx.array:
    """Scaled token embeddings of a decoder `stack`, with `image_features(pixel_values)` at the
    `image_id` placeholders (none given: the placeholders' own embeddings)."""
    is_image = input_ids == image_id  # [B, T]
    ids = input_ids
    if image_id >= stack.args.vocab_size:
        ids = mx.where(is_image, 0, input_ids)  # transformers embeds an out-of-vocabulary placeholder as id 0
    h = stack.embed(ids)  # [B, T, hidden]
    if pixel_values is None:
        return h
    return merge_image_features(h, is_image, image_features(pixel_values), token)


def merge_image_features(h: mx.array, is_image: mx.array, features: mx.array, token: str) -> mx.array:
    """Embeddings h [B, T, D] with the k-th image position (row-major over the batch) taking
    the k-th feature of `features` [N, per_image, D], as transformers' `masked_scatter` does."""
    n_images, per_image, D = features.shape
    n_slots = int(is_image.sum().item())
    if n_slots != n_images * per_image:
        raise ImageError(
            "pixel_values", f"{n_images} image(s) need {n_images * per_image} {token} tokens "
            f"({per_image} each), but input_ids hold {n_slots}"
        )
    flat = is_image.reshape(-1)
    index = mx.maximum(mx.cumsum(flat.astype(mx.int32)) - 1, 0)
    merged = mx.where(flat[:, None], features.astype(h.dtype).reshape(-1, D)[index], h.reshape(-1, D))
    return merged.reshape(h.shape)


def image_block_ids(is_image: mx.array) -> mx.array:
    """int32 [B, T]: the block number of each image token (0, 1, ... per row), -1 for text
    (transformers' `get_block_sequence_ids_for_mask`; Google's `_make_block_mask_indices`)."""
    flag = is_image.astype(mx.int32)
    previous = mx.pad(flag[:, :-1], [(0, 0), (1, 0)])
    starts = flag * (1 - previous)  # 1 where a block begins
    return mx.where(is_image, mx.cumsum(starts, axis=1) - 1, -1)


def with_image_blocks(mask, blocks: mx.array, window: int | None, offset: int):
    """`mask` (bool [B|1, 1, T, S], "causal" or None) widened so the T new tokens see every token
    of their own image block; blocks [B, T] are their block ids (-1: text); `offset` counts the
    tokens before them (a "causal" mask then spans S = offset + T keys).

    The keys of a call end with the T new tokens (every cache returns them last for T > 1),
    and a block never reaches back into the cache: prefill keeps each block in one call
    (engine.prefill).  Sliding-window layers keep their lower bound, key > query - window,
    inside a block too: transformers 5.25's AND(sliding_window, OR(causal, blocks)).  Google's
    reference bounds both sides (|query - key| < window); the two differ only for a block longer
    than the window, which no released Gemma 3 has (256 soft tokens, windows of 512 or 1024).
    """
    if mask is None:
        return None  # T = 1 and every key visible: a one-token block sees itself anyway
    B, T = blocks.shape
    S = offset + T if isinstance(mask, str) else mask.shape[-1]
    q, k = blocks[:, :, None], blocks[:, None, :]
    same = (q == k) & (q >= 0)  # [B, T, T]
    if window is not None:
        i = mx.arange(T)
        same = same & (i[None, :] > i[:, None] - window)[None]
    same = same[:, None]  # [B, 1, T, T]
    if S > T:
        same = mx.concatenate([mx.zeros((B, 1, T, S - T), dtype=mx.bool_), same], axis=-1)
    if isinstance(mask, str):
        mask = mx.arange(S)[None, :] <= mx.arange(S - T, S)[:, None]
    return mask | same


def chunk_ends(ids: mx.array, step: int, token_id: int | None = None) -> list[int]:
    """Where prefill chunks of `step` positions end; with an image `token_id`, each end is
    moved past any image block it would cut (in any row), so a block is attended in one call."""
    T = ids.shape[1]
    inside = [False] * T
    if token_id is not None and T > 1:
        pair = (ids[:, :-1] == token_id) & (ids[:, 1:] == token_id)  # an end at e cuts a block if pair[e - 1]
        inside = mx.any(pair, axis=0).tolist()
    ends, end = [], 0
    while end < T:
        end = min(end + step, T)
        while end < T and inside[end - 1]:
            end += 1
        ends.append(end)
    return ends
