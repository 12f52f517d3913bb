"""Data preparation commands.

    python -m iclora.prepare compose --input_dir photos/ --output_dir data/mine --grid 1x3
    python -m iclora.prepare caption --data_dir data/mine --grid 1x3 --model_id Qwen/Qwen2.5-VL-3B-Instruct

`python -m iclora.prepare COMMAND --help` lists a command's flags (the same as `iclora prepare COMMAND`).
"""

from __future__ import annotations

import sys
from typing import Sequence

from ..cli import did_you_mean, parse_config, run_cli

COMMANDS = {
    "compose": "separate photos (a folder or a name prefix per set) -> grid composites with one caption each",
    "caption": "caption composites with a vision-language model, one marker per panel",
}


def usage(prog: str) -> str:
    lines = [f"usage: {prog} COMMAND [flags]", "", "commands:"]
    lines += [f"  {name:<9} {text}" for name, text in COMMANDS.items()]
    return "\n".join(lines + ["", f"{prog} COMMAND --help lists a command's flags."])


def main(argv: Sequence[str] | None = None, prog: str = "python -m iclora.prepare"):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(usage(prog))
        raise SystemExit(0)
    if not argv or argv[0] not in COMMANDS:
        got = f", got {argv[0]!r}{did_you_mean(argv[:1], list(COMMANDS))}" if argv else ""
        raise ValueError(f"expected a command ({' | '.join(COMMANDS)}){got}; {prog} --help lists them")
    command, rest = argv[0], argv[1:]
    prog = f"{prog} {command}"
    if command == "compose":
        from . import compose as module

        cfg = parse_config(module.ComposeConfig, rest, prog=prog, description=module.__doc__)
        result = module.compose(cfg)
        module.report(result, cfg)
        return result
    from . import caption as module

    cfg = parse_config(module.CaptionConfig, rest, prog=prog, description=module.__doc__)
    result = module.caption(cfg)
    module.report(result)
    return result


if __name__ == "__main__":
    run_cli(main)
