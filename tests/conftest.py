"""Shared test settings: where the fixtures live, and tiny-model names."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from hypothesis import HealthCheck, settings

# Full float32 matrix products on CUDA: MLX runs them as TF32 there by default
# (MLX_ENABLE_TF32, ml-explore/mlx#3860), about 1e-3 off the fp32 references.
os.environ.setdefault("MLX_ENABLE_TF32", "0")

TESTS = Path(__file__).parent
FIXTURES = TESTS / "fixtures"
TINY_MODELS = ["gemma", "gemma2", "gemma3"]

# Lets test modules `from conftest import ...` whatever directory pytest runs from.
sys.path.insert(0, str(TESTS))

# Property tests draw the same examples on every run in the default ("ci") profile, so a red
# CI always means a regression, never bad luck.  MLX_GEMMA_FUZZ=long (or pytest's
# --hypothesis-profile=long) explores freely with the campaign's budget, keeping what it
# finds in .hypothesis/ to replay.  tests/fuzzing.py sizes each test from the profile.
_QUIET = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large]
settings.register_profile("ci", derandomize=True, database=None, deadline=None, max_examples=100,
                          print_blob=True, suppress_health_check=_QUIET)
settings.register_profile("long", derandomize=False, deadline=None, max_examples=5000,
                          print_blob=True, suppress_health_check=_QUIET)
_PROFILE = os.environ.get("MLX_GEMMA_FUZZ", "ci")
if _PROFILE not in ("ci", "long"):
    raise SystemExit(f"MLX_GEMMA_FUZZ must be 'ci' or 'long', got {_PROFILE!r}")
settings.load_profile(_PROFILE)
