"""Command lines from config dataclasses (jsonargparse).

Each dataclass field becomes `--name` with the field's docstring as help; `--config
FILE.yaml` sets any of them and flags given on the command line override the file.
Booleans are switches (`--flag` / `--no_flag`); lists take space-separated values
(`--panels_to_inpaint 2 3`). Validation lives in the dataclass's `__post_init__`, whose
ValueError is printed as one `error:` line.
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from typing import Any, Sequence, TypeVar

import docstring_parser
from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser

T = TypeVar("T")


def build_parser(config_cls: type, prog: str, description: str, defaults: dict[str, Any] | None = None) -> ArgumentParser:
    defaults = defaults or {}
    docs = {p.arg_name: p.description for p in docstring_parser.parse_from_object(config_cls).params}
    hints = typing.get_type_hints(config_cls)
    parser = ArgumentParser(prog=prog, description=description, exit_on_error=True)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file setting any of the flags below.")
    for field in dataclasses.fields(config_cls):
        kind = hints[field.name]
        if field.name in defaults:
            default = defaults[field.name]
        elif field.default is not dataclasses.MISSING:
            default = field.default
        elif field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        else:
            default = dataclasses.MISSING
        options: dict[str, Any] = {"help": docs.get(field.name)}
        if default is dataclasses.MISSING:
            options["required"] = True
        else:
            options["default"] = default
        if kind is bool:
            parser.add_argument(f"--{field.name}", action=ActionYesNo, **options)
        elif typing.get_origin(kind) is list:
            parser.add_argument(f"--{field.name}", nargs="+", type=typing.get_args(kind)[0], **options)
        else:
            parser.add_argument(f"--{field.name}", type=kind, **options)
    return parser


def parse_config(config_cls: type[T], argv: Sequence[str] | None, prog: str, description: str = "",
                 defaults: dict[str, Any] | None = None) -> T:
    """Parse `argv` into `config_cls`; any error ends the program with one clear line."""
    parser = build_parser(config_cls, prog, description, defaults)
    namespace = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    values = {f.name: namespace[f.name] for f in dataclasses.fields(config_cls)}
    try:
        return config_cls(**values)
    except ValueError as error:
        parser.error(str(error))
        raise  # unreachable: parser.error exits


def run_cli(main, argv: Sequence[str] | None = None) -> None:
    """Call `main(argv)` and turn the errors users cause into one line and exit status 2."""
    try:
        main(argv)
    except (ValueError, FileNotFoundError, NotImplementedError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
