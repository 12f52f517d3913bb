"""Data preparation commands.

    python -m iclora.prepare compose --input_dir photos/ --output_dir data/mine --grid 1x3
    python -m iclora.prepare caption --data_dir data/mine --grid 1x3 --model_id Qwen/Qwen2.5-VL-3B-Instruct

`python -m iclora.prepare COMMAND --help` lists a command's flags.
"""

from __future__ import annotations

import sys
from typing import Sequence

from ..cli import parse_config, run_cli

COMMANDS = ("compose", "caption")


def main(argv: Sequence[str] | None = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        got = f", got {argv[0]!r}" if argv else ""
        raise ValueError(f"expected a command ({' | '.join(COMMANDS)}){got}; add --help after it for its flags")
    command, rest = argv[0], argv[1:]
    prog = f"python -m iclora.prepare {command}"
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
