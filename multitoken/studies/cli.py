"""The `multitoken experiment ...` and `multitoken lab ...` commands, as (command path, typed function)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def study_commands() -> list[tuple[tuple[str, ...], Callable[..., Any], dict[str, Any]]]:
    """(command path, function, Command fields) of every study: the flags are the fields of the
    function's options dataclass (`config_cls`), or else the function's parameters."""
    from multitoken.studies.lab.choice_points import ChoicePointsOptions, choice_points_cli
    from multitoken.studies.lab.emergence import EmergenceOptions, emergence_cli
    from multitoken.studies.lab.horizon import HorizonOptions, horizon_cli
    from multitoken.studies.lab.icl import IclOptions, icl_cli
    from multitoken.studies.lab.induction_heads import InductionHeadsOptions, induction_heads_cli
    from multitoken.studies.lab.mutual_information import MutualInformationOptions, mutual_information_cli
    from multitoken.studies.lab.surprisal import SurprisalOptions, surprisal_cli
    from multitoken.studies.lab.tasks import TasksOptions, tasks_cli
    from multitoken.studies.lab.think import ThinkOptions, think_cli
    from multitoken.studies.paper.bytes_level import BytesOptions, bytes_experiment
    from multitoken.studies.paper.induction import InductionOptions, induction
    from multitoken.studies.paper.nsweep import NsweepOptions, nsweep
    from multitoken.studies.paper.polynomial import PolynomialOptions, polynomial
    from multitoken.studies.scaling.from_csv import ScalingFitOptions, scaling_fit
    from multitoken.studies.scaling.grid import ScalingRunOptions, scaling_run_cli

    return [
        (("experiment", "bytes"), bytes_experiment, {"config_cls": BytesOptions}),
        (("experiment", "induction"), induction, {"config_cls": InductionOptions}),
        (("experiment", "nsweep"), nsweep, {"config_cls": NsweepOptions}),
        (("experiment", "polynomial"), polynomial, {"config_cls": PolynomialOptions}),
        (("lab", "tasks"), tasks_cli, {"config_cls": TasksOptions}),
        (("lab", "surprisal"), surprisal_cli, {"config_cls": SurprisalOptions}),
        (("lab", "induction-heads"), induction_heads_cli, {"config_cls": InductionHeadsOptions}),
        (("lab", "think"), think_cli, {"config_cls": ThinkOptions}),
        (("lab", "icl"), icl_cli, {"config_cls": IclOptions}),
        (("lab", "emergence"), emergence_cli, {"config_cls": EmergenceOptions}),
        (("lab", "mutual-information"), mutual_information_cli, {"config_cls": MutualInformationOptions}),
        (("lab", "choice-points"), choice_points_cli, {"config_cls": ChoicePointsOptions}),
        (("lab", "horizon"), horizon_cli, {"config_cls": HorizonOptions}),
        (("lab", "scaling", "fit"), scaling_fit, {"config_cls": ScalingFitOptions, "positional": ("csv",)}),
        (("lab", "scaling", "run"), scaling_run_cli, {"config_cls": ScalingRunOptions}),
    ]
