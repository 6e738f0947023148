"""POST /v1/embeddings: sentence embeddings from EmbeddingGemma folders, as `mlx_gemma.embed` makes them.

Only sentence encoders are served here.  A generative Gemma's mean-pooled hidden states were
never trained to place similar texts near each other, so offering them as embeddings would not
be honest; such a model gets a 400 naming the endpoint it serves.  Each encoder runs on one
worker thread of its own (MLX's streams are bound to the thread that made them), off the event
loop, and its vectors are read back to NumPy on that thread.
"""

from __future__ import annotations

import asyncio
import base64
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..embed import embed
from ..errors import MlxGemmaError
from .api_errors import ApiError
from .media import NOT_YET
from .schemas import EmbeddingRequest
from .served import ServedModel


class Embedder:
    """One encoder's work, all on one thread of its own."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlx_gemma-embed")

    async def vectors(self, texts: list[str], prompt_name: str | None, dimensions: int | None) -> np.ndarray:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, self._run, texts, prompt_name, dimensions)

    def _run(self, texts, prompt_name, dimensions) -> np.ndarray:
        return np.array(embed(self.model, self.tokenizer, texts, prompt_name=prompt_name, dimensions=dimensions),
                        dtype=np.float32)

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


async def create_embeddings(served: ServedModel, request: EmbeddingRequest) -> dict:
    """OpenAI's embeddings list for the request's texts."""
    if served.embedder is None:
        raise ApiError(400, f"`{served.name}` is a generative model: /v1/embeddings serves sentence encoders "
                            "(EmbeddingGemma)", "model", "not_an_embedding_model")
    texts = [request.input] if isinstance(request.input, str) else request.input
    if not isinstance(texts[0], str):
        raise ApiError(400, f"token-id input is {NOT_YET}: send text", "input", "unsupported_parameter")
    try:
        vectors = await served.embedder.vectors(texts, request.prompt_name, request.dimensions)
    except MlxGemmaError as e:
        raise ApiError(400, str(e), None, "invalid_value") from None
    data = [{"object": "embedding", "index": i, "embedding": _encoded(v, request.encoding_format)}
            for i, v in enumerate(vectors)]
    # The input's own tokens (the task prompt and <bos>/<eos> the encoder adds are not the caller's).
    tokens = sum(len(served.tokenizer.encode(t, add_bos=False)) for t in texts)
    return {"object": "list", "data": data, "model": served.name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def _encoded(vector: np.ndarray, encoding: str):
    if encoding == "base64":  # OpenAI's: little-endian float32 bytes
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()
