"""The one folder the web app reads and writes in, and the command lines it parses.

Every path typed into the page is relative to the workspace (`--workspace`, default: the
folder the app starts in): a path that climbs out (`../x`, a symlink pointing away) or an
absolute one is refused with one `error:`-style line, before anything reads it. Model ids
(`tiny-sdxl`, `org/name` on the hub) are not paths: a value that names no folder in the
workspace is passed on as an id.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Sequence

from ..cli import parse_config

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


class Workspace:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise FileNotFoundError(f"--workspace {root}: no such folder")

    def path(self, value: str | None, what: str, must_exist: bool = False) -> Path:
        """`value` (relative to the workspace) as an absolute path inside it; `what` names the
        field in the error ('data folder', '--lora_path', ...)."""
        text = (value or "").strip()
        if not text:
            raise ValueError(f"{what}: empty (give a path inside the workspace {self.root})")
        if PurePosixPath(text).is_absolute() or PureWindowsPath(text).is_absolute() or text.startswith("~"):
            raise ValueError(f"{what} {text}: absolute paths are refused; give a path inside the workspace {self.root}")
        if ".." in re.split(r"[\\/]", text):
            raise ValueError(f"{what} {text}: '..' is refused; give a path inside the workspace {self.root}")
        path = (self.root / text).resolve()  # follows symlinks: one pointing out is caught below
        if path != self.root and self.root not in path.parents:
            raise ValueError(f"{what} {text}: leads outside the workspace {self.root}")
        if must_exist and not path.exists():
            raise FileNotFoundError(f"{what} {text}: no such file or folder in {self.root}")
        return path

    def inside(self, value: str | os.PathLike, what: str) -> Path:
        """A path from a config file or typed flags: relative ones as path() takes them,
        absolute ones (the app's own flags are absolute) only when inside the workspace."""
        if not Path(value).is_absolute():
            return self.path(str(value), what)
        path = Path(value).resolve()
        if path != self.root and self.root not in path.parents:
            raise ValueError(f"{what} {value}: outside the workspace {self.root}")
        return path

    def relative(self, path: str | os.PathLike) -> str:
        """How the page shows a path of the workspace."""
        return Path(path).resolve().relative_to(self.root).as_posix() or "."

    def model(self, value: str | None, what: str) -> str:
        """A base model: a folder of the workspace (absolute path), else a model id."""
        text = (value or "").strip()
        if not text:
            raise ValueError(f"{what}: empty")
        if (self.root / text).exists() or not HUB_ID.fullmatch(text):
            return str(self.path(text, what, must_exist=True))
        return text

    def folders(self, *, containing: str | None = None, limit: int = 500) -> list[str]:
        """Sub-folders of the workspace (for the pickers), those holding `containing` only if
        given; hidden folders and virtual environments are left out."""
        found = []
        for folder, subfolders, files in os.walk(self.root):
            subfolders[:] = sorted(s for s in subfolders if not s.startswith(".") and s not in SKIPPED)
            if containing is None or containing in files or containing in subfolders:
                found.append(self.relative(folder))
            if len(found) >= limit:
                break
        return found


SKIPPED = {"__pycache__", "node_modules", "venv", "site-packages"}


def parse_flags(config_cls: type, argv: Sequence[str], prog: str, defaults: dict[str, Any] | None = None):
    """The command line's own parsing and validation; its one `error:` line becomes a
    ValueError carrying that line's text (what the page shows)."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            return parse_config(config_cls, list(argv), prog=prog, defaults=defaults)
    except SystemExit:
        message = err.getvalue().strip().splitlines()
        text = message[-1] if message else "invalid settings"
        raise ValueError(text.removeprefix("error: ")) from None


def command_line(script: str, argv: Sequence[str]) -> str:
    """The command a user would type for the same run (shown in the page)."""
    import shlex

    return " ".join(["python", script, *map(shlex.quote, argv)])
