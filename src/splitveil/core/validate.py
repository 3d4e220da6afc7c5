"""Checks the specs share (`__post_init__`): one line naming the field and what it must be."""

from __future__ import annotations

from splitveil.core.errors import ConfigError


def _values(spec, name: str):
    """The value(s) of field `name`: each item of a tuple or list, or the value itself."""
    value = getattr(spec, name)
    return value if isinstance(value, (tuple, list)) else (value,)


def at_least(spec, minimum: float, *names: str) -> None:
    """Each field in `names` (a number, or a tuple of numbers) is at least `minimum`."""
    for name in names:
        for item in _values(spec, name):
            if item < minimum:
                raise ConfigError(f"{name} must be at least {minimum:g}, got {item}")


def positive(spec, *names: str) -> None:
    """Each field in `names` (a number, or a tuple of numbers) is above 0 (durations, periods)."""
    for name in names:
        for item in _values(spec, name):
            if not item > 0:
                raise ConfigError(f"{name} must be positive, got {item}")


def cuts(values) -> None:
    """One cut (edge | cloud) or two (a Λ-split), non-negative and strictly increasing."""
    if not 1 <= len(values) <= 2 or min(values) < 0 or any(b <= a for a, b in zip(values, values[1:])):
        raise ConfigError(f"give one cut or two increasing ones, like 2,28; got {','.join(map(str, values))}")


def lambda_cuts(cuts) -> None:
    """`cuts` is a Λ-split's (A, B) with 0 < A < B."""
    if len(cuts) != 2 or not 0 < cuts[0] < cuts[1]:
        raise ConfigError(f"a Λ-split needs two cuts 0 < A < B, like 2,28; got {','.join(map(str, cuts))}")


def one_of(spec, name: str, allowed) -> None:
    """Each value of field `name` (a string or a tuple of them) is in `allowed`."""
    for item in _values(spec, name):
        if item not in allowed:
            raise ConfigError(f"unknown {name} {item!r}; use one of {', '.join(sorted(allowed))}")
