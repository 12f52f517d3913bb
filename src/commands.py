"""The `iclora` command: every command line of the package under one name.

    iclora train --backend flux --data_dir data/sets --output_dir output/flux_lora
    iclora infer --lora_path output/flux_lora/final_model --input_image in.png --prompt "..." --panels_to_inpaint 2
    iclora prepare compose --input_dir photos --output_dir data/sets --grid 1x3
    iclora convert --lora_path output/flux_lora/final_model
    iclora ui --workspace ~/loras

Each command hands its flags, unchanged, to the entry function of the script it stands for
(src/training/train_*_ic_lora.py, src/inference/*_ic_lora_inference.py, `python -m
iclora.prepare`, src/convert.py, `python -m iclora.app`), so both take the same flags and give the same results.
`train` and `infer` pick the backend's script (its defaults: model, rank, steps, guidance)
from `--backend`, else from a `--config` file's `backend:`, else (infer) from the LoRA's
iclora_config.json; SDXL when none says.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Sequence

from . import __version__
from .cli import did_you_mean, run_cli

PROG = "iclora"
COMMANDS = {
    "train": "train an In-Context LoRA on composites with masked panels (--backend sdxl | flux)",
    "infer": "complete masked panels of a composite with a LoRA (--backend sdxl | flux, default: the LoRA's)",
    "prepare": "make training data: compose photos into composites, caption them (compose | caption)",
    "convert": "write the LoRA files other programs load, or merge an SDXL concat LoRA into a UNet",
    "ui": "the local web app: look at the data, start and watch runs, inpaint by clicking (pip install 'iclora[ui]')",
}
def usage() -> str:
    lines = [f"usage: {PROG} COMMAND [flags]", "", "commands:"]
    lines += [f"  {name:<9} {text}" for name, text in COMMANDS.items()]
    return "\n".join(lines + ["", f"{PROG} COMMAND --help lists a command's flags."])


def _flag_value(argv: Sequence[str], flag: str) -> str | None:
    """The value of `flag` (`--flag V` or `--flag=V`) as argparse reads it: the last one wins."""
    value = None
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def _config_backend(path: str) -> str | None:
    """`backend:` of a --config file; None where the file cannot say (its parser reports why)."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return data.get("backend") if isinstance(data, dict) else None


def pick_backend(argv: Sequence[str], from_lora: bool = False) -> str:
    """Which backend's script runs `argv`. An unknown name goes to the SDXL script, whose
    parser names the choices."""
    backend = _flag_value(argv, "--backend")
    if backend is None and (config := _flag_value(argv, "--config")):
        backend = _config_backend(config)
    lora = _flag_value(argv, "--lora_path") if from_lora else None
    if backend is None and lora and lora.lower() != "none":
        from .backends.lora_files import read_metadata

        backend = read_metadata(lora).get("backend")
    from .backends.registry import backend_names

    return backend if backend in backend_names() else "sdxl"


def dispatch(argv: Sequence[str] | None = None):
    """Run one command; returns what its entry function returns."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(usage())
        raise SystemExit(0)
    if argv and argv[0] == "--version":
        print(f"{PROG} {__version__}")
        raise SystemExit(0)
    if not argv or argv[0] not in COMMANDS:
        got = f", got {argv[0]!r}{did_you_mean(argv[:1], list(COMMANDS))}" if argv else ""
        raise ValueError(f"expected a command ({' | '.join(COMMANDS)}){got}; {PROG} --help lists them")
    command, rest = argv[0], argv[1:]
    prog = f"{PROG} {command}"
    if command in ("train", "infer"):  # each backend has its own scripts (their defaults differ)
        from .backends.registry import backend_spec

        spec = backend_spec(pick_backend(rest, from_lora=command == "infer"))
        module = importlib.import_module(spec.train_script if command == "train" else spec.infer_script)
    elif command == "prepare":
        from .prepare import __main__ as module
    elif command == "ui":
        from .app import __main__ as module
    else:
        from . import convert as module
    return module.main(rest, prog=prog)


def main(argv: Sequence[str] | None = None) -> None:
    """The `iclora` console script: any error is one `error:` line and an exit status."""
    run_cli(dispatch, argv)
