"""keras-hub style `Gemma3TextEmbedder` for EmbeddingGemma: from_preset, encode_text, predict, similarity.

keras-hub 0.32's `Gemma3TextEmbedder` (`keras_hub/src/models/gemma3/gemma3_text_embedder.py`)
wraps a `Gemma3Backbone(is_embedding_model=True)`: `encode_text(text)` and `predict(x)` give
L2-normalized embeddings (numpy), `predict({"token_ids", "padding_mask"})` takes packed ids when
`preprocessor=None`, and `similarity(q, d)` is the dot product.  This is the same surface on
`mlx_gemma.embed`; the numbers are sentence-transformers' (see embed.py).  Where keras-hub's
backbone differs -- its bidirectional sliding mask sees `W - W//2 - 1` positions back and
`W//2` ahead, one fewer back than transformers' `|q - k| < W//2 + 1` -- we follow
transformers / sentence-transformers, the format the weights are published in.
"""

from __future__ import annotations

import os

import mlx.core as mx
import numpy as np

from ..api import load
from ..embed import embed
from ..errors import MlxGemmaError
from .presets import resolve_preset

# keras-hub 0.32's EmbeddingGemma preset (gemma3_presets.py) -> its Hugging Face repository.
EMBEDDER_PRESETS = {"embedding_gemma3_300m": "hf://google/embeddinggemma-300m"}


class Gemma3TextEmbedder:
    """Sentence embeddings in keras-hub's names; `prompt_name` / `dimensions` as mlx_gemma.embed."""

    def __init__(self, model, tokenizer, preprocessor: bool = True, prompt_name: str | None = None,
                 dimensions: int | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.preprocessor = preprocessor  # False / None: predict takes packed ids only (keras-hub's preprocessor=None)
        self.prompt_name, self.dimensions = prompt_name, dimensions

    @classmethod
    def from_preset(cls, preset: str | os.PathLike, preprocessor="auto", dtype=None, **kwargs) -> "Gemma3TextEmbedder":
        """`"embedding_gemma3_300m"`, an `hf://` handle, or a sentence-transformers folder."""
        if isinstance(preset, str) and preset in EMBEDDER_PRESETS:
            preset = EMBEDDER_PRESETS[preset]
        model, tokenizer = load(resolve_preset(preset), dtype=dtype)
        return cls(model, tokenizer, preprocessor is not None, **kwargs)

    def encode_text(self, text, **kwargs) -> np.ndarray:
        """Embeddings [N, D] of a string or a list of strings (keras-hub: predict on a list)."""
        return self.predict([text] if isinstance(text, str) else text, **kwargs)

    def predict(self, x, batch_size: int | None = None, **kwargs) -> np.ndarray:
        """Strings -> embeddings [N, D]; or `{"token_ids", "padding_mask"}` (already packed, as
        keras-hub's preprocessor packs them: <bos> text <eos> then padding) -> embeddings."""
        batch_size = 32 if batch_size is None else batch_size
        if isinstance(x, dict):
            return self._predict_packed(x, batch_size)
        if not self.preprocessor:
            raise MlxGemmaError("this embedder has no preprocessor (preprocessor=None): pass "
                                "{'token_ids', 'padding_mask'}")
        kwargs = {"prompt_name": self.prompt_name, "dimensions": self.dimensions, **kwargs}
        out = embed(self.model, self.tokenizer, [x] if isinstance(x, str) else list(x), batch_size=batch_size,
                    **kwargs)
        return np.asarray(out.astype(mx.float32))

    def _predict_packed(self, x: dict, batch_size: int) -> np.ndarray:
        if "token_ids" not in x:
            raise MlxGemmaError("packed input needs 'token_ids' (and 'padding_mask')")
        ids = np.asarray(x["token_ids"])
        mask = np.asarray(x.get("padding_mask", np.ones(ids.shape, bool))).astype(bool)
        if ids.ndim != 2 or mask.shape != ids.shape:
            raise MlxGemmaError(f"token_ids {ids.shape} and padding_mask {mask.shape} must be the same [N, T]")
        rows = [self.model(mx.array(ids[i:i + batch_size]), mx.array(mask[i:i + batch_size]))
                for i in range(0, len(ids), batch_size)]
        return np.asarray(mx.concatenate(rows, axis=0).astype(mx.float32))

    @staticmethod
    def similarity(query_embeddings, document_embeddings) -> np.ndarray:
        """[num_queries, num_documents] dot products (cosine, for normalized embeddings)."""
        return np.asarray(query_embeddings) @ np.asarray(document_embeddings).T
