"""The `multitoken lab ...` experiments, as (command path, typed function) pairs for multitoken.cli."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def lab_commands() -> list[tuple[tuple[str, ...], Callable[..., Any]]]:
    """(command path, function) of every lab experiment; `lab scaling fit` is registered separately."""
    from multitoken.lab.choice_points import choice_points_cli
    from multitoken.lab.emergence import emergence_cli
    from multitoken.lab.horizon import horizon_cli
    from multitoken.lab.icl import icl_cli
    from multitoken.lab.induction_heads import induction_heads_cli
    from multitoken.lab.mutual_information import mutual_information_cli
    from multitoken.lab.surprisal import surprisal_cli
    from multitoken.lab.tasks import tasks_cli
    from multitoken.lab.think import think_cli

    return [
        (("lab", "tasks"), tasks_cli),
        (("lab", "surprisal"), surprisal_cli),
        (("lab", "induction-heads"), induction_heads_cli),
        (("lab", "think"), think_cli),
        (("lab", "icl"), icl_cli),
        (("lab", "emergence"), emergence_cli),
        (("lab", "mutual-information"), mutual_information_cli),
        (("lab", "choice-points"), choice_points_cli),
        (("lab", "horizon"), horizon_cli),
    ]
