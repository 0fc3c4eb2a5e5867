"""The study commands that took plain parameters take options dataclasses now: the same flags parse to
the same values (the defaults below are the old signatures'), and a recorded command line reproduces
its options."""

import dataclasses

import pytest

from multitoken.studies.runs import options_command

from helpers import parsed_options

BEFORE = {
    ("experiment", "induction"): dict(
        out="reports/induction", scale="small", seed=0, device="auto", corpus="", names=""
    ),
    ("lab", "think"): dict(out="reports/lab/think", scale="small", seed=0, device="auto"),
    ("lab", "icl"): dict(
        out="reports/lab/icl", scale="small", checkpoint=None, shots=None, seed=0, device="auto"
    ),
    ("lab", "emergence"): dict(out="reports/lab/emergence", scale="small", seed=0, device="auto"),
    ("lab", "scaling", "run"): dict(out="reports/lab/scaling-run", scale="small", seed=0, device="auto"),
}
"""Each command's parameters and defaults before it took an options dataclass, in flag order."""
GIVEN = {
    ("experiment", "induction"): ["--out", "o", "--scale", "cpu", "--seed", "3", "--device", "cpu",
                                  "--corpus", "stories/", "--names", "names.txt"],
    ("lab", "think"): ["--out", "o", "--scale", "debug", "--seed", "3", "--device", "cpu"],
    ("lab", "icl"): ["--out", "o", "--scale", "debug", "--checkpoint", "run", "--shots", "0", "--seed", "3",
                     "--device", "cuda:1"],
    ("lab", "emergence"): ["--out", "o", "--scale", "medium", "--seed", "3", "--device", "cpu"],
    ("lab", "scaling", "run"): ["--out", "o", "--scale", "debug", "--seed", "3", "--device", "cpu"],
}  # fmt: skip
"""Every flag of each command given once."""


def values(options) -> dict:
    return {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}


@pytest.mark.parametrize("path", list(BEFORE), ids=" ".join)
def test_flags_parse_to_the_values_the_parameters_had(path):
    defaults = parsed_options(list(path))
    assert list(values(defaults).items()) == list(BEFORE[path].items())
    given = parsed_options([*path, *GIVEN[path]])
    flags = GIVEN[path][::2]
    assert [f"--{name.replace('_', '-')}" for name in values(given)] == flags  # every flag, in order
    expected = {flag[2:].replace("-", "_"): text for flag, text in zip(flags, GIVEN[path][1::2], strict=True)}
    expected = {k: int(v) if k in ("seed", "shots") else v for k, v in expected.items()}
    assert values(given) == expected
    assert options_command(path, defaults) == ["multitoken", *path]
    assert options_command(path, given) == ["multitoken", *path, *GIVEN[path]]
    assert parsed_options(options_command(path, given)[1:]) == given


@pytest.mark.parametrize(
    "argv",
    [
        ["lab", "think", "--scale", "medium"],
        ["lab", "emergence", "--scale", "large"],
        ["lab", "icl", "--seed", "three"],
        ["lab", "scaling", "run", "--seed", "1.5"],
    ],
)
def test_choices_and_types_are_checked_as_before(argv):
    with pytest.raises(SystemExit):
        parsed_options(argv)
