"""Sentence embeddings from an EmbeddingGemma model: `mlx_gemma.embed(model, tokenizer, texts)`.

Follows sentence-transformers' `SentenceTransformer.encode` on the same folder: the task
prompt is prepended to each text (`prompt_name` picks one of
config_sentence_transformers.json's `prompts`, e.g. "query" -> "task: search result |
query: "), the text is tokenized as the folder's HF tokenizer does (<bos> ... <eos>, cut to
`max_seq_length` with the special tokens kept), run through the model (mean pooling, Dense,
Normalize), and optionally truncated to `dimensions` (Matryoshka: 768 / 512 / 256 / 128 for
embeddinggemma-300m) and normalized again, in sentence-transformers' order
(`truncate_dim`, then `normalize_embeddings`).
"""

from __future__ import annotations

from typing import Sequence

import mlx.core as mx

from .arguments import integer_arg
from .errors import MlxGemmaError
from .embedding_folder import EmbeddingSettings
from .models.embedding_gemma import Model as EncoderModel, l2_normalize


def embed(
    model,
    tokenizer,
    texts: str | Sequence[str],
    *,
    prompt_name: str | None = None,
    prompt: str | None = None,
    dimensions: int | None = None,
    batch_size: int = 32,
) -> mx.array:
    """L2-normalized float32 embeddings [N, D] of `texts` (one string gives [1, D]).

    `prompt` (a literal prefix) wins over `prompt_name` (a key of the model's prompts), which
    wins over the folder's `default_prompt_name`, as in sentence-transformers.  `dimensions`
    keeps the first D components, then re-normalizes.  Rows are padded per batch of
    `batch_size`; padding never changes a text's vector (its keys are masked, its positions
    are not pooled).
    """
    if not isinstance(model, EncoderModel):
        raise MlxGemmaError("embed needs a sentence encoder (an EmbeddingGemma folder loaded with mlx_gemma.load)")
    # Built in memory, not loaded: no prompts, EmbeddingGemma's <bos> ... <eos>, no length cut.
    settings = model.embedding_settings or EmbeddingSettings()
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts:
        raise MlxGemmaError("embed needs at least one text")
    bad = next((t for t in texts if not isinstance(t, str)), None)
    if bad is not None:
        raise MlxGemmaError(f"embed takes strings, found {type(bad).__name__}")
    batch_size = integer_arg("batch_size", batch_size, minimum=1)
    if dimensions is not None:
        dimensions = integer_arg("dimensions", dimensions, minimum=1, maximum=model.args.dimensions)
    prefix = _resolve_prompt(settings, prompt, prompt_name)
    ids = [_token_ids(tokenizer, settings, prefix + t) for t in texts]
    out = [_embed_batch(model, tokenizer, ids[i:i + batch_size]) for i in range(0, len(ids), batch_size)]
    vectors = mx.concatenate(out, axis=0)
    if dimensions is not None:
        vectors = vectors[:, :dimensions]
    if dimensions is not None or not model.args.normalize or vectors.dtype != mx.float32:
        # Unit vectors again, in float32: after truncation (sentence-transformers' truncate_dim,
        # then normalize_embeddings), for a folder without Normalize, or after rounding to bf16/fp16.
        vectors = l2_normalize(vectors.astype(mx.float32))
    return vectors


def _resolve_prompt(settings, prompt: str | None, prompt_name: str | None) -> str:
    """The prefix to prepend, chosen as SentenceTransformer._resolve_prompt chooses it."""
    if prompt is not None:
        return prompt
    if prompt_name is not None:
        if prompt_name not in settings.prompts:
            known = ", ".join(sorted(settings.prompts)) or "none"
            raise MlxGemmaError(f"prompt_name {prompt_name!r:.80} is not one of the model's prompts ({known})")
        return settings.prompts[prompt_name]
    if settings.default_prompt_name is not None:
        return settings.prompts[settings.default_prompt_name]
    return ""


def _token_ids(tokenizer, settings, text: str) -> list[int]:
    """Ids as the HF tokenizer gives them with truncation=True: the text cut to leave room
    for the special tokens, which are always kept (<eos> stays last)."""
    ids = tokenizer.encode(text, add_bos=False, add_eos=False)
    special = int(settings.add_bos) + int(settings.add_eos)
    if settings.max_seq_length is not None:
        ids = ids[: max(settings.max_seq_length - special, 0)]
    return [tokenizer.bos_id] * settings.add_bos + ids + [tokenizer.eos_id] * settings.add_eos


def _embed_batch(model, tokenizer, rows: list[list[int]]) -> mx.array:
    """One right-padded batch through the model: [len(rows), D]."""
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_id if tokenizer.pad_id >= 0 else 0
    ids = mx.array([r + [pad] * (width - len(r)) for r in rows])
    mask = mx.array([[True] * len(r) + [False] * (width - len(r)) for r in rows])
    out = model(ids, mask)
    mx.eval(out)
    return out
