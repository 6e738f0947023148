"""keras-hub's `GemmaTokenizer`: mlx_gemma's tokenizer (which already speaks keras-hub's
tokenizer interface: tokenize, detokenize, vocabulary_size, ...) plus `from_preset`.

`from_preset` lives here, with the presets, so that the core tokenizer knows nothing of them.
"""

from __future__ import annotations

import os

from .. import tokenizer as core
from .presets import tokenizer_file


class GemmaTokenizer(core.GemmaTokenizer):
    """mlx_gemma.tokenizer.GemmaTokenizer with keras-hub's `from_preset`."""

    @classmethod
    def from_preset(cls, preset: str | os.PathLike) -> GemmaTokenizer:
        """The tokenizer of a preset name, hf:// / kaggle:// handle or folder (see mlx_gemma.tasks)."""
        path = tokenizer_file(os.fspath(preset))
        return cls.from_folder(path) if path.is_dir() else cls.from_file(path)
