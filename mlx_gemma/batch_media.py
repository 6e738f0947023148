"""The media blocks of a batched job, as the prefix cache names them (batching.py): where each image,
video frame or audio clip of a prompt lies and which item it holds, so a reused prefix keeps a block
only where it held the same item, and which items a prompt still has to feed past a reused prefix."""

from __future__ import annotations

import mlx.core as mx

from .gemma4_prompts import Gemma4Media
from .image_chat import image_digests, image_spans
from .jobs import Job, Row


def media_blocks(model, job: Job) -> tuple:
    """(start, end, digest) of each media block, in prompt order, when every item of the job's media
    has its own run of soft tokens (Gemma 3's images; Gemma 4's images, video frames and clips), so
    the prefix cache may reuse a block holding the same item; () when they cannot be named."""
    media, ids = dict(job.media or {}), job.prompt_ids
    kinds = media_kinds(model)
    if {k for keys, _ in kinds for k in keys if keys[0] in media} != set(media):
        return ()  # inputs of a kind not named here, or an item's arrays not all there
    blocks = []
    for keys, spec in kinds:
        if keys[0] not in media:
            continue
        spans = image_spans(ids, spec.token_id)
        # Gemma 4: each item's arrays named together, as its PromptCache names them
        digests = image_digests(media[keys[0]]) if len(keys) == 1 else Gemma4Media(**{k: media[k] for k in keys}).digests()
        if len(spans) != len(digests):
            return ()
        blocks += [(a, b, d) for (a, b), d in zip(spans, digests)]
    return tuple(sorted(blocks))


def media_kinds(model) -> list:
    """(the model's input keys of one kind of media, its soft-token spec) per kind it takes."""
    image, audio = model.image_input, model.audio_input
    if image is not None and not image.variable and audio is None:  # Gemma 3 (PaliGemma has no prefix cache)
        return [(("pixel_values",), image)]
    kinds = [(("pixel_values", "image_positions"), image)] if image is not None else []
    return kinds + ([(("audio_features", "audio_mask"), audio)] if audio is not None else [])


def media_past(model, row: Row) -> dict:
    """The job's media items whose blocks lie past the reused prefix (those before it are cached)."""
    media, out = dict(row.job.media), {}
    for keys, spec in media_kinds(model):
        if keys[0] in media:
            fed = [i for i, (a, _) in enumerate(image_spans(row.job.prompt_ids, spec.token_id)) if a >= row.fed]
            out.update({k: media[k][mx.array(fed)] for k in keys if fed})
    return out
