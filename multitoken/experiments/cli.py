"""The `multitoken experiment NAME` commands."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def experiment_commands() -> list[tuple[tuple[str, ...], Callable[..., Any]]]:
    """(command path, function) for every experiment; the functions' parameters are the flags."""
    from multitoken.experiments.bytes_level import bytes_experiment
    from multitoken.experiments.induction import induction
    from multitoken.experiments.nsweep import nsweep
    from multitoken.experiments.polynomial import polynomial

    return [
        (("experiment", "bytes"), bytes_experiment),
        (("experiment", "induction"), induction),
        (("experiment", "nsweep"), nsweep),
        (("experiment", "polynomial"), polynomial),
    ]
