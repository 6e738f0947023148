"""Checks on the numbers a caller passes in: one place that says what an integer or a
bounded real is, so every setting is refused the same way, with its name in the message.

An integer is any `numbers.Integral` (numpy integers too) but never `True`/`False`; a real is
any finite `numbers.Real` that is not a bool.  The error type is the caller's (a generation
setting raises GenerationError, a training one TrainingError).  Values read from files go
through `json_input`, whose messages also name the file and the key.
"""

from __future__ import annotations

import math
import numbers

from .errors import MlxGemmaError


def is_integer(value) -> bool:
    """True for Python and numpy integers; False for bools, floats and anything else."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)  # np.bool_ is not Integral


def is_real(value) -> bool:
    """True for a finite int or float (numpy ones too); False for bools, NaN and infinities."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):  # nor is it Real
        return False
    if isinstance(value, numbers.Integral):  # math.isfinite(10**400) raises OverflowError
        return abs(value) <= 1e308
    return math.isfinite(value)


def integer_arg(name: str, value, minimum: int | None = None, maximum: int | None = None,
                error: type[MlxGemmaError] = MlxGemmaError) -> int:
    """`value` as an int if it is an integer in [minimum, maximum], else `error` naming `name`."""
    if not is_integer(value) or (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise error(f"{name} must be {_integer_range(minimum, maximum)}, got {value!r:.80}")
    return int(value)


def real_arg(name: str, value, low: float | None = None, high: float | None = None, *,
             above: float | None = None, below: float | None = None,
             error: type[MlxGemmaError] = MlxGemmaError) -> float:
    """`value` as a float if it is a finite number with low <= value <= high, above < value < below.

    Any bound may be None (unbounded).  Errors are `error` naming `name` and the range.
    """
    ok = is_real(value) and not ((low is not None and value < low) or (high is not None and value > high)
                                  or (above is not None and not value > above)
                                  or (below is not None and not value < below))
    if not ok:
        bounds = [f">= {low}" if low is not None else "", f"> {above}" if above is not None else "",
                  f"<= {high}" if high is not None else "", f"< {below}" if below is not None else ""]
        wanted = " and ".join(b for b in bounds if b)
        raise error(f"{name} must be a finite number{' ' + wanted if wanted else ''}, got {value!r:.80}")
    return float(value)


def _integer_range(minimum, maximum) -> str:
    if minimum is not None and maximum is not None:
        return f"an integer in [{minimum}, {maximum}]"
    if minimum is not None:
        return "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
    return f"an integer <= {maximum}" if maximum is not None else "an integer"
