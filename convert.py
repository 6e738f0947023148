#!/usr/bin/env python
"""Convert Hugging Face, Keras or GGUF Gemma checkpoints to MLX folders.

The same as `python -m mlx_gemma.convert`; run with --help for the flags.
"""

import sys

from mlx_gemma.convert import main

if __name__ == "__main__":
    sys.exit(main())
