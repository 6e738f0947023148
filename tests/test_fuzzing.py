"""The fuzz tests' own settings: the default run is reproducible, the long campaign is not."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fuzzing import fuzz_settings, refused_cleanly
from mlx_gemma.errors import ConfigError


def _drawn(examples: int) -> list[bytes]:
    seen: list[bytes] = []

    @fuzz_settings(examples)
    @given(st.binary(max_size=64))
    def property_test(blob):
        seen.append(blob)

    property_test()
    return seen


def test_the_default_profile_draws_the_same_examples_every_run():
    if settings.get_current_profile_name() != "ci":
        pytest.skip("MLX_GEMMA_FUZZ=long explores freely, by design")
    first, second = _drawn(40), _drawn(40)
    assert len(set(first)) > 10 and first == second  # varied, and the same both times
    assert settings.default.derandomize and settings.default.database is None


def test_refused_cleanly_lets_only_our_errors_naming_the_input_through():
    with refused_cleanly("config.json"):
        raise ConfigError("/m/config.json", "bad")
    with pytest.raises(AssertionError, match="does not name the input"):
        with refused_cleanly("config.json"):
            raise ConfigError("/m/other.json", "bad")
    with pytest.raises(TypeError):
        with refused_cleanly("config.json"):
            raise TypeError("a bare error is a defect")
