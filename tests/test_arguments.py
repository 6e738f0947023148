"""mlx_gemma.arguments: what counts as an integer or a bounded real setting, and the errors."""

import numpy as np
import pytest

from mlx_gemma.arguments import integer_arg, is_integer, is_real, real_arg
from mlx_gemma.errors import GenerationError, MlxGemmaError


@pytest.mark.parametrize("value", [0, 7, -3, np.int32(5), np.int64(2**40), 10**400])
def test_integers(value):
    assert is_integer(value)


@pytest.mark.parametrize("value", [True, False, np.bool_(True), 2.0, "3", None, [1], np.array(3)])
def test_not_integers(value):
    assert not is_integer(value)


@pytest.mark.parametrize("value", [0, 1.5, -2, np.float32(0.25), np.int8(3), 10**300])
def test_reals(value):
    assert is_real(value)


@pytest.mark.parametrize("value", [True, np.bool_(False), float("nan"), float("inf"), -float("inf"), 10**400, "1",
                                   None, complex(1, 0)])
def test_not_reals(value):
    assert not is_real(value)


def test_integer_arg_bounds_and_type():
    assert integer_arg("k", np.int64(3), 1) == 3 and type(integer_arg("k", np.int64(3), 1)) is int
    assert integer_arg("n", 0, 0, 4) == 0
    with pytest.raises(GenerationError, match=r"^k must be a positive integer, got 0$"):
        integer_arg("k", 0, 1, error=GenerationError)
    with pytest.raises(MlxGemmaError, match=r"n must be an integer in \[0, 4\], got 5"):
        integer_arg("n", 5, 0, 4)
    with pytest.raises(MlxGemmaError, match="got True"):
        integer_arg("n", True, 0)


def test_real_arg_open_and_closed_bounds():
    assert real_arg("p", 1, above=0, high=1) == 1.0
    assert real_arg("dropout", 0, 0, below=1) == 0.0
    for bad in (0, 1.0000001, float("nan")):
        with pytest.raises(MlxGemmaError, match=r"p must be a finite number > 0 and <= 1"):
            real_arg("p", bad, above=0, high=1)
    with pytest.raises(MlxGemmaError, match=r"dropout must be a finite number >= 0 and < 1, got 1"):
        real_arg("dropout", 1, 0, below=1)
    with pytest.raises(GenerationError, match=r"^x must be a finite number, got inf$"):
        real_arg("x", float("inf"), error=GenerationError)
