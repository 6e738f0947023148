"""Shared test settings: where the fixtures live, and tiny-model names."""

from __future__ import annotations

import sys
from pathlib import Path

TESTS = Path(__file__).parent
FIXTURES = TESTS / "fixtures"
TINY_MODELS = ["gemma", "gemma2", "gemma3"]

# Lets test modules `from conftest import ...` whatever directory pytest runs from.
sys.path.insert(0, str(TESTS))
