"""mlx_gemma: Google's Gemma family on Apple's MLX.

The public face: `load` (model + tokenizer), `load_model`, mlx-lm's functional API
(`generate`, `stream_generate`, `batch_generate`), the typed errors, and
the keras-hub style tasks (`GemmaCausalLM`, `GemmaBackbone`,
`GemmaCausalLMPreprocessor`, `GemmaTokenizer`, `PaliGemmaCausalLM` & co.; imported on first use).
"""

import warnings

from .errors import MlxGemmaError

# As in mlx-lm, `mlx_gemma.generate` is the function; the module of the same name (the CLI,
# `python -m mlx_gemma.generate`) stays importable by its full name (`from mlx_gemma.generate
# import main`).  Importing the functions rebinds the package attribute to them after the
# import system bound it to the module.  Because the package imports that module, `python -m`
# would warn that it runs a module already imported; here that is harmless (the CLI module
# keeps no state), so that one warning is silenced.
from .generate import batch_generate, generate, stream_generate
from .loading import load, load_model

warnings.filterwarnings("ignore", message=r"'mlx_gemma\.generate' found in sys\.modules",
                        category=RuntimeWarning)

__version__ = "0.1.0"

_TASKS = ("GemmaCausalLM", "GemmaBackbone", "GemmaCausalLMPreprocessor", "GemmaTokenizer",
          "PaliGemmaCausalLM", "PaliGemmaBackbone", "PaliGemmaCausalLMPreprocessor", "PaliGemmaTokenizer")

__all__ = ["load", "load_model", "generate", "stream_generate", "batch_generate", "MlxGemmaError", *_TASKS]


def __getattr__(name: str):
    # The tasks pull in the tokenizer and the decode loop: load them only when asked for.
    if name in _TASKS:
        from . import tasks

        return getattr(tasks, name)
    raise AttributeError(f"module 'mlx_gemma' has no attribute {name!r}")
