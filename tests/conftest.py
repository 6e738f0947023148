"""Shared test settings: where the fixtures live, and tiny-model names."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Full float32 matrix products on CUDA: MLX runs them as TF32 there by default
# (MLX_ENABLE_TF32, ml-explore/mlx#3860), about 1e-3 off the fp32 references.
os.environ.setdefault("MLX_ENABLE_TF32", "0")

TESTS = Path(__file__).parent
FIXTURES = TESTS / "fixtures"
TINY_MODELS = ["gemma", "gemma2", "gemma3"]

# Lets test modules `from conftest import ...` whatever directory pytest runs from.
sys.path.insert(0, str(TESTS))
