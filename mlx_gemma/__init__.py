"""mlx_gemma: Google's Gemma family on Apple's MLX.

The public face: `load` (model + tokenizer), `load_model`, mlx-lm's functional API
(`generate`, `stream_generate`, `batch_generate`), `embed` (EmbeddingGemma), the typed errors, and
the keras-hub style tasks (`GemmaCausalLM`, `GemmaBackbone`,
`GemmaCausalLMPreprocessor`, `GemmaTokenizer`, `PaliGemmaCausalLM` & co.).
"""

import warnings

from .errors import MlxGemmaError

# As in mlx-lm, `mlx_gemma.generate` is the function; the module of the same name (the CLI,
# `python -m mlx_gemma.generate`) stays importable by its full name (`from mlx_gemma.generate
# import main`).  Importing the functions rebinds the package attribute to them after the
# import system bound it to the module.  Because the package imports that module, `python -m
# mlx_gemma.generate` would warn that it runs a module already imported; here that is harmless
# (run as __main__, the module keeps no state: it runs its CLI), so that one warning is silenced.
# The other command lines (`mlx_gemma.lora`, `mlx_gemma.fuse`, ...) are never imported by the
# package: the library they sit on lives in `tuner/`.
from .generate import batch_generate, generate, stream_generate
from .embed import embed
from .api import load, load_model
from .tasks import (
    Gemma3CausalLM,
    Gemma3CausalLMPreprocessor,
    Gemma3TextEmbedder,
    Gemma4CausalLM,
    Gemma4CausalLMPreprocessor,
    GemmaBackbone,
    GemmaCausalLM,
    GemmaCausalLMPreprocessor,
    GemmaTokenizer,
    PaliGemmaBackbone,
    PaliGemmaCausalLM,
    PaliGemmaCausalLMPreprocessor,
    PaliGemmaTokenizer,
)

warnings.filterwarnings("ignore", message=r"'mlx_gemma\.generate' found in sys\.modules",
                        category=RuntimeWarning)

__version__ = "0.1.0"

__all__ = ["load", "load_model", "generate", "stream_generate", "batch_generate", "embed", "MlxGemmaError",
           "GemmaCausalLM", "GemmaBackbone", "GemmaCausalLMPreprocessor", "GemmaTokenizer",
           "PaliGemmaCausalLM", "PaliGemmaBackbone", "PaliGemmaCausalLMPreprocessor", "PaliGemmaTokenizer",
           "Gemma3TextEmbedder", "Gemma3CausalLM", "Gemma3CausalLMPreprocessor", "Gemma4CausalLM",
           "Gemma4CausalLMPreprocessor"]
