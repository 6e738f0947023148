"""mlx_gemma: Google's Gemma family on Apple's MLX.

The public face: `load` (model + tokenizer), `load_model`, and the typed errors.
"""

from .errors import MlxGemmaError
from .loading import load, load_model

__version__ = "0.1.0"

__all__ = ["load", "load_model", "MlxGemmaError"]
