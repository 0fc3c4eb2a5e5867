"""The `multitoken` command: subcommands mapped to typed functions and dataclasses.

Flags are the dataclass fields or function parameters in kebab case (`n_future` -> `--n-future`), with
help from the field docstrings. `--config FILE.yaml` supplies any field; flags given on the command line
override it. A user error prints one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import itertools
import sys
import textwrap
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from multitoken.config import dataclass_from_dict, strip_optional
from multitoken.errors import UserError


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports errors as one line and exit status 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


# ---- reading types and docstrings --------------------------------------------------------------------


def attribute_docs(cls: type) -> dict[str, str]:
    """The string literal under each annotated field of a class (the convention of our configs)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body
    docs = {}
    for node, following in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = following.value.value.strip()
    return docs


def param_docs(fn: Callable) -> dict[str, str]:
    """`name: text` lines from the Args section of a Google-style docstring."""
    docs, in_args = {}, False
    for line in (inspect.getdoc(fn) or "").splitlines():
        stripped = line.strip()
        if stripped in ("Args:", "Arguments:"):
            in_args = True
        elif in_args and ":" in stripped and not line.startswith(" " * 8):
            name, text = stripped.split(":", 1)
            docs[name.strip()] = text.strip()
        elif in_args and not stripped:
            in_args = False
    return docs


def _scalar(tp: Any) -> Callable[[str], Any]:
    if tp is bool:
        return _parse_bool
    if tp in (int, float, str):
        return tp
    return str


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


VERBATIM_LIST_FLAGS = frozenset({"stop"})
"""List fields of free text, where a comma is content: several values, never split at commas."""


def add_argument(
    parser: argparse.ArgumentParser, name: str, annotation: Any, help_text: str, required: bool = False
) -> None:
    """One flag for a typed field: bools get --x/--no-x, lists take several values or a comma list."""
    flag = "--" + name.replace("_", "-")
    tp = strip_optional(annotation)
    origin = typing.get_origin(tp)
    kwargs: dict[str, Any] = {
        "dest": name,
        "default": argparse.SUPPRESS,
        "help": help_text.replace("%", "%%"),
        "required": required,
    }
    if tp is bool:
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
    elif origin is list:
        item = _scalar(typing.get_args(tp)[0])
        if name in VERBATIM_LIST_FLAGS:
            parser.add_argument(flag, nargs="+", type=item, action="extend", **kwargs)
        else:
            parser.add_argument(flag, nargs="+", type=_comma_list(item), action=_ExtendFlat, **kwargs)
    elif origin is typing.Literal:
        parser.add_argument(flag, choices=typing.get_args(tp), **kwargs)
    elif origin is dict:
        return  # nested mappings come from the YAML config only
    else:
        parser.add_argument(flag, type=_scalar(tp), metavar=name.upper(), **kwargs)


def _comma_list(item: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        return [item(part) for part in text.split(",") if part]

    return parse


class _ExtendFlat(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, [v for group in values for v in group])


def _resolved_hints(obj: Any) -> dict[str, Any]:
    return typing.get_type_hints(obj)


# ---- commands ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class Command:
    """A subcommand: a function taking one config dataclass, or plain typed keyword parameters."""

    path: tuple[str, ...]
    """Words after `multitoken`, e.g. ("lab", "scaling", "fit")."""
    target: Callable[..., Any]
    """What runs."""
    config_cls: type | None = None
    """The dataclass built from flags and --config; None means the target's own parameters are the flags."""
    extra_fields: tuple[type, ...] = ()
    """Further dataclasses whose fields are flags too (collected into `nested_key`)."""
    nested_key: str = ""
    """Config key receiving the extra dataclasses' flags (train: `model`)."""
    build: Callable[[dict[str, Any]], Any] | None = None
    """Turns the explicit values into the config object; default: config_cls(**values)."""
    positional: tuple[str, ...] = ()
    """Parameters taken as positional arguments rather than --flags (e.g. the CSV of `lab scaling fit`)."""
    aliases: tuple[tuple[str, str, Any], ...] = ()
    """(flag, parameter, value): a flag that sets a parameter to a value, e.g. --no-speculative."""

    @property
    def help(self) -> str:
        return (inspect.getdoc(self.target) or "").split("\n\n")[0]


def _describe(parser: argparse.ArgumentParser, command: Command) -> None:
    for flag, name, value in command.aliases:
        parser.add_argument(
            flag,
            dest=name,
            action="store_const",
            const=value,
            default=argparse.SUPPRESS,
            help=f"same as --{name.replace('_', '-')} {value}",
        )
    if command.config_cls is None:
        docs = param_docs(command.target)
        hints = _resolved_hints(command.target)
        for name, param in inspect.signature(command.target).parameters.items():
            required = param.default is inspect.Parameter.empty
            if name in command.positional:
                parser.add_argument(
                    name, type=_scalar(strip_optional(hints.get(name, str))), help=docs.get(name)
                )
                continue
            suffix = "(required)" if required else f"(default: {param.default})"
            add_argument(
                parser, name, hints.get(name, str), f"{docs.get(name, '')} {suffix}", required=required
            )
        return
    parser.add_argument(
        "--config", dest="__config", default=None, metavar="FILE.yaml", help="YAML file of fields"
    )
    for cls in (command.config_cls, *command.extra_fields):
        docs, hints = attribute_docs(cls), _resolved_hints(cls)
        for f in dataclasses.fields(cls):
            if cls is not command.config_cls and f.name == "vocab_size":
                continue  # comes from the data
            default = f.default if f.default is not dataclasses.MISSING else "derived"
            add_argument(parser, f.name, hints[f.name], f"{docs.get(f.name, '')} (default: {default})")


def _load_yaml(path: str) -> dict[str, Any]:
    import yaml

    try:
        values = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as err:
        raise UserError(f"cannot read config {path}: {err.strerror}") from err
    except yaml.YAMLError as err:
        raise UserError(f"config {path} is not valid YAML: {str(err).splitlines()[0]}") from err
    if not isinstance(values, dict):
        raise UserError(f"config {path} must be a mapping of field: value")
    return {str(k).replace("-", "_"): v for k, v in values.items()}


def explicit_values(command: Command, namespace: argparse.Namespace) -> dict[str, Any]:
    """YAML values overlaid by the flags actually given, with extra-dataclass fields nested."""
    given = {k: v for k, v in vars(namespace).items() if not k.startswith("__")}
    config_path = getattr(namespace, "__config", None)
    values = _load_yaml(config_path) if config_path else {}
    if command.nested_key:
        nested_names = {f.name for cls in command.extra_fields for f in dataclasses.fields(cls)}
        nested = dict(values.pop(command.nested_key, None) or {})
        for source in (values, given):
            for name in list(source):
                if name in nested_names:
                    nested[name] = source.pop(name)
        values[command.nested_key] = nested
    values.update(given)
    return values


def run_command(command: Command, namespace: argparse.Namespace) -> Any:
    if command.config_cls is None:
        return command.target(**{k: v for k, v in vars(namespace).items() if not k.startswith("__")})
    values = explicit_values(command, namespace)
    if command.build is not None:
        config = command.build(values)
    else:
        config = dataclass_from_dict(command.config_cls, values)
    return command.target(config)


def commands() -> list[Command]:
    """Every subcommand. Imports stay inside so `multitoken --help` is quick."""
    from multitoken.config import ModelConfig
    from multitoken.data.shards import PrepareConfig, prepare
    from multitoken.train import TrainConfig, resolve_cli_config, train

    found = [
        Command(("prepare",), prepare, PrepareConfig),
        Command(("train",), train, TrainConfig, (ModelConfig,), "model", resolve_cli_config),
    ]
    found += _optional_commands()
    return found


def _optional_commands() -> list[Command]:
    """Commands whose modules may be absent in a partial install."""
    found = []
    try:
        from multitoken.generate_cli import generate_cli

        found.append(
            Command(("generate",), generate_cli, aliases=(("--no-speculative", "speculative", "off"),))
        )
    except ImportError:
        pass
    try:
        from multitoken.evals.cli import eval_commands

        found += [Command(path, fn) for path, fn in eval_commands()]
    except ImportError:
        pass
    for module, function in (
        ("multitoken.experiments.cli", "experiment_commands"),
        ("multitoken.lab.cli", "lab_commands"),
    ):
        try:
            pairs = getattr(__import__(module, fromlist=[function]), function)()
        except ImportError:
            continue
        found += [Command(path, fn) for path, fn in pairs]
    try:
        from multitoken.lab.scaling import scaling_fit

        found.append(Command(("lab", "scaling", "fit"), scaling_fit, positional=("csv",)))
    except ImportError:
        pass
    try:
        from multitoken.lab.scaling_run import scaling_run_cli

        found.append(Command(("lab", "scaling", "run"), scaling_run_cli))
    except ImportError:
        pass
    return found


def build_parser(available: list[Command]) -> OneLineParser:
    parser = OneLineParser(prog="multitoken", description=__doc__.split("\n\n")[0])
    groups: dict[tuple[str, ...], Any] = {(): parser.add_subparsers(dest="__command_0", metavar="COMMAND")}
    parsers: dict[tuple[str, ...], argparse.ArgumentParser] = {}
    for command in available:
        for depth in range(1, len(command.path) + 1):
            prefix = command.path[:depth]
            if prefix in parsers:
                continue
            parent = groups[prefix[:-1]]
            is_leaf = depth == len(command.path)
            sub = parent.add_parser(
                prefix[-1],
                help=command.help if is_leaf else f"{' '.join(prefix)} commands",
                description=inspect.getdoc(command.target) if is_leaf else None,
                formatter_class=argparse.RawDescriptionHelpFormatter,
            )
            sub.__class__ = OneLineParser
            parsers[prefix] = sub
            if is_leaf:
                _describe(sub, command)
                sub.set_defaults(__command=command)
            else:
                groups[prefix] = sub.add_subparsers(dest=f"__command_{depth}", metavar="COMMAND")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        parser = build_parser(commands())
        namespace = parser.parse_args(argv)
        command = getattr(namespace, "__command", None)
        if command is None:
            parser.print_help()
            return 2
        run_command(command, namespace)
    except UserError as err:
        print(f"multitoken: error: {err}", file=sys.stderr)
        return 2
    except SystemExit as exit_:  # argparse: --help (0) or a usage error (2)
        return exit_.code if isinstance(exit_.code, int) else 2
    except KeyboardInterrupt:
        print("multitoken: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
