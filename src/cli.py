"""Command lines from config dataclasses (jsonargparse).

Each dataclass field becomes `--name` with the field's docstring as help; `--config
FILE.yaml` sets any of them and flags given on the command line override the file.
Booleans are switches (`--flag` / `--no_flag`); lists take space-separated values
(`--panels_to_inpaint 2 3`). Validation lives in the dataclass's `__post_init__`, whose
ValueError is printed as one `error:` line.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import re
import sys
import typing
from typing import Any, Sequence, TypeVar

import docstring_parser
from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser

from .errors import RunStopped

T = TypeVar("T")


class _Parser(ArgumentParser):
    def error(self, message: str, ex: Exception | None = None):
        # One line, no usage block: jsonargparse splits type errors over lines ('Parser key
        # "x":' / 'Expected ...') and prints the whole usage first. `--help` shows usage.
        text = " ".join(str(message).split())
        text = re.sub(r'Parser key "(\w+)"( element \d+)?:', lambda m: f"--{m.group(1)}{m.group(2) or ''}:", text)
        text = re.sub(r"<class '(\w+)'>", r"\1", text)
        text = re.sub(r"arguments are required: (.*)", lambda m: "arguments are required: " + ", ".join(
            a if a.startswith("-") else f"--{a}" for a in m.group(1).split(", ")), text)
        flags = [o for o in self._option_string_actions if o.startswith("--")]
        if match := re.search(r"unrecognized arguments: (.*)", text, flags=re.IGNORECASE):
            text += did_you_mean(match.group(1).split(), flags)
        elif match := re.search(r"Option '(\w+)' is not accepted", text):  # a key of a --config file
            text += did_you_mean([match.group(1)], [f[2:] for f in flags])
        self.exit(2, f"error: {text}\n")


def did_you_mean(given: Sequence[str], known: Sequence[str]) -> str:
    """' (did you mean --x?)' for the first of `given` that is close to one of `known`, else ''."""
    for word in given:
        close = difflib.get_close_matches(word.split("=", 1)[0], known, n=1, cutoff=0.6)
        if close:
            return f" (did you mean {close[0]}?)"
    return ""


def build_parser(config_cls: type, prog: str, description: str, defaults: dict[str, Any] | None = None) -> ArgumentParser:
    defaults = defaults or {}
    docs = {p.arg_name: p.description for p in docstring_parser.parse_from_object(config_cls).params}
    hints = typing.get_type_hints(config_cls)
    # No prefix matching: --max_train_step must not quietly mean --max_train_steps.
    parser = _Parser(prog=prog, description=description, exit_on_error=True, allow_abbrev=False)
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
        choices = _literal_choices(kind)
        if choices and _is_optional(kind):  # `--quantize none` unsets a value a --config file set
            parser.add_argument(f"--{field.name}", choices=[*choices, "none"], action=_OptionalChoice, **options)
        elif choices:
            parser.add_argument(f"--{field.name}", choices=choices, **options)
        elif kind is bool or kind == typing.Optional[bool]:  # --name / --no_name (not given: None)
            parser.add_argument(f"--{field.name}", action=ActionYesNo, **options)
        elif typing.get_origin(kind) is list:
            parser.add_argument(f"--{field.name}", nargs="+", type=typing.get_args(kind)[0], **options)
        else:
            parser.add_argument(f"--{field.name}", type=kind, **options)
    return parser


def _is_optional(kind) -> bool:
    return typing.get_origin(kind) is typing.Union and type(None) in typing.get_args(kind)


class _OptionalChoice(argparse.Action):
    """An optional choice: `none` on the command line stores None (e.g. to unset a value
    that a --config file set)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, None if values == "none" else values)


def _literal_choices(kind) -> list[str] | None:
    """['a', 'b'] for Literal['a', 'b'] or Optional[Literal['a', 'b']], else None."""
    if typing.get_origin(kind) is typing.Union:
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        kind = args[0] if len(args) == 1 else kind
    return list(typing.get_args(kind)) if typing.get_origin(kind) is typing.Literal else None


def parse_config(config_cls: type[T], argv: Sequence[str] | None, prog: str, description: str = "",
                 defaults: dict[str, Any] | None = None) -> T:
    """Parse `argv` into `config_cls`; any error ends the program with one clear line."""
    parser = build_parser(config_cls, prog, description, defaults)
    namespace = parser.parse_args(_config_files_first(list(sys.argv[1:] if argv is None else argv)))
    values = {f.name: namespace[f.name] for f in dataclasses.fields(config_cls)}
    try:
        return config_cls(**values)
    except ValueError as error:
        parser.error(str(error))
        raise  # unreachable: parser.error exits


def _config_files_first(argv: list[str]) -> list[str]:
    """Move `--config FILE` to the front: argparse applies arguments in order, and every flag
    on the command line must override the file wherever it is written."""
    configs, others, i = [], [], 0
    while i < len(argv):
        if argv[i] == "--config":
            configs += argv[i : i + 2]
            i += 2
        else:
            (configs if argv[i].startswith("--config=") else others).append(argv[i])
            i += 1
    return configs + others


def train_entry(argv: Sequence[str] | None, prog: str, description: str, defaults: dict[str, Any]):
    """What every train_*_ic_lora.py does: parse the flags (a bad flag fails here, before the
    slow imports), then train and return the TrainResult."""
    from .logs import setup_logging
    from .training.config import TrainConfig

    setup_logging()
    cfg = parse_config(TrainConfig, argv, prog=prog, description=description, defaults=defaults)
    if cfg.dry_run:  # the data and settings only: no denoiser loaded
        from .prepare.check import dry_run

        return dry_run(cfg)
    from .training.trainer import train

    result = train(cfg)
    print(f"saved {result.final_dir}")
    return result


def infer_entry(argv: Sequence[str] | None, prog: str, description: str, defaults: dict[str, Any]):
    """What every *_ic_lora_inference.py does: parse the flags, then inpaint and return the
    files written."""
    from .inference.config import InferConfig
    from .logs import setup_logging

    setup_logging()
    cfg = parse_config(InferConfig, argv, prog=prog, description=description, defaults=defaults)
    if cfg.dry_run:  # the plan and its memory only: no weights loaded, nothing written
        from .inference.dry_run import dry_run

        return dry_run(cfg)
    if cfg.input_dir:  # the folder mode runs the single-image steps once per input
        from .inference.folder import run_folder as run
    else:
        from .inference.inpaint import run

    files = run(cfg)
    for file in files:
        print(file)
    return files


def run_cli(main, argv: Sequence[str] | None = None) -> None:
    """Call `main(argv)` and turn what users cause or meet into one `error:` line: bad input
    exits 2, a stopped run its own status (1; 130 / 143 after SIGINT / SIGTERM), Ctrl-C
    outside the training loop 130."""
    try:
        main(argv)
    except RunStopped as error:
        # Every process of a multi-process run stops together, for the same reason: one says so.
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {error}", file=sys.stderr)
        raise SystemExit(error.exit_code) from None
    except (ValueError, OSError, NotImplementedError) as error:  # OSError: missing files, models
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("error: interrupted; nothing more was written", file=sys.stderr)
        raise SystemExit(130) from None
