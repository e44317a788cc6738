"""Range checks for numeric options: one BadInput line naming the option, its value and the range.

Written so that nan fails every check (every comparison with nan is false) and inf fails
the bounded ones: an option never silently turns into an empty or unbounded run.
"""

from __future__ import annotations

import math

from .errors import BadInput

# Far beyond any model's depth, and small enough that a range up to it is a cheap list: every
# layer selector (`--layers 0-13`, `--site resid.out[0-3]`) refuses layers from here on.
LAYER_CEILING = 10_000


def at_least(option: str, value: float, minimum: float) -> None:
    if not value >= minimum:
        raise BadInput(f"{option} {value} must be at least {minimum}")


def share(option: str, value: float) -> None:
    """A share of something: in (0, 1]."""
    if not 0 < value <= 1:
        raise BadInput(f"{option} {value} must be in (0, 1], e.g. 0.2 for a fifth")


def positive(option: str, value: float) -> None:
    """A finite number above 0 (an exponent, a scale)."""
    if not (math.isfinite(value) and value > 0):
        raise BadInput(f"{option} {value} must be a finite number above 0")
