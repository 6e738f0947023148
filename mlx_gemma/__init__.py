"""mlx_gemma: Google's Gemma family on Apple's MLX.

The public face: `load` (model + tokenizer), `load_model`, the typed errors, and
the keras-hub style tasks (`GemmaCausalLM`, `GemmaBackbone`,
`GemmaCausalLMPreprocessor`, `GemmaTokenizer`, `PaliGemmaCausalLM` & co.; imported on first use).
"""

from .errors import MlxGemmaError
from .loading import load, load_model

__version__ = "0.1.0"

_TASKS = ("GemmaCausalLM", "GemmaBackbone", "GemmaCausalLMPreprocessor", "GemmaTokenizer",
          "PaliGemmaCausalLM", "PaliGemmaBackbone", "PaliGemmaCausalLMPreprocessor", "PaliGemmaTokenizer")

__all__ = ["load", "load_model", "MlxGemmaError", *_TASKS]


def __getattr__(name: str):
    # The tasks pull in the tokenizer and the decode loop: load them only when asked for.
    if name in _TASKS:
        from . import tasks

        return getattr(tasks, name)
    raise AttributeError(f"module 'mlx_gemma' has no attribute {name!r}")
