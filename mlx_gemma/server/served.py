"""What the server serves: each model with its tokenizer and scheduler, and the defaults it samples with.

One `ServedModel` per `--model`; clients name it by the string given on the command line (as
mlx-lm's server does), which `GET /v1/models` lists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Defaults:
    """The sampling a request gets for fields it leaves out (the command line's --temp etc.)."""

    temp: float = 0.0  # greedy, as mlx-lm's server
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    max_tokens: int = 512  # mlx-lm's server default; never past the context


@dataclass
class ServedModel:
    name: str  # what requests put in "model"
    model: Any  # the loaded mlx_gemma model
    tokenizer: Any  # its GemmaTokenizer
    scheduler: Any  # a started mlx_gemma.batching.Scheduler (None for a sentence encoder)
    created: int  # unix time the server loaded it
    embedder: Any = None  # a sentence encoder's embeddings.Embedder (None for a generative model)

    @property
    def context(self) -> int:
        return self.model.args.max_position_embeddings

    def card(self) -> dict:
        """The model's entry in GET /v1/models (OpenAI's model object)."""
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "mlx_gemma"}
