"""`python -m mlx_gemma.server`: see mlx_gemma/server/cli.py."""

import sys

from .cli import main

sys.exit(main())
