"""Panel markers in IC-LoRA captions: `[IMAGE 1]`, `[TOP-LEFT]`, `[SCENE-1]`, ...

A unified caption is one summary sentence followed by one description per panel, each
behind its marker, in panel order (row-major, as `panels.py` indexes them):

    A garment and the person wearing it; [IMAGE 1] a shirt, front; [IMAGE 2] ...

Composing, captioning and the training-data check all take the marker names from here.
"""

from __future__ import annotations

import re
from typing import Literal

from ..panels import Grid

MarkerStyle = Literal["image", "position", "scene"]
MARKER_STYLES = ("image", "position", "scene")
SEPARATOR = "; "
_ROW_NAMES = {1: [""], 2: ["TOP", "BOTTOM"], 3: ["TOP", "MIDDLE", "BOTTOM"]}
_COL_NAMES = {1: [""], 2: ["LEFT", "RIGHT"], 3: ["LEFT", "CENTER", "RIGHT"]}
# Any bracketed upper-case word, with optional number: what a caption's markers look like.
MARKER_PATTERN = re.compile(r"\[(?:IMAGE ?\d+|SCENE-?\d+|(?:TOP|MIDDLE|BOTTOM)(?:-(?:LEFT|CENTER|RIGHT))?|LEFT|CENTER|RIGHT)\]")


def panel_markers(grid: Grid, style: MarkerStyle) -> list[str]:
    """The marker of every panel of `grid`, row-major."""
    n = grid.num_panels
    if style == "image":
        return [f"[IMAGE {i + 1}]" for i in range(n)]
    if style == "scene":
        return [f"[SCENE-{i + 1}]" for i in range(n)]
    if style != "position":
        raise ValueError(f"--marker_style: expected one of {', '.join(MARKER_STYLES)}, got {style!r}")
    if grid.rows not in _ROW_NAMES or grid.cols not in _COL_NAMES:
        raise ValueError(f"--marker_style position names grids of up to 3x3, not {grid}: use image or scene")
    return [f"[{'-'.join(p for p in (r, c) if p)}]" for r in _ROW_NAMES[grid.rows] for c in _COL_NAMES[grid.cols]]


def strip_marker(text: str) -> str:
    """A panel description without a marker its author may already have written in front."""
    return MARKER_PATTERN.sub("", text, count=1).strip(" ;,\n") if MARKER_PATTERN.match(text.strip()) else text.strip()


def unified_caption(summary: str, panels: list[str], markers: list[str]) -> str:
    """'summary; [M1] panel 1; [M2] panel 2; ...' (a missing summary is left out; a missing
    panel description leaves its bare marker, so panel positions still line up)."""
    if len(panels) != len(markers):
        raise ValueError(f"{len(panels)} panel descriptions for {len(markers)} markers")
    parts = [summary.strip().rstrip(";")] if summary.strip() else []
    parts += [f"{m} {strip_marker(p)}".rstrip() for m, p in zip(markers, panels)]
    return SEPARATOR.join(parts)


def find_markers(caption: str) -> list[str]:
    """The markers written in a caption, in order."""
    return MARKER_PATTERN.findall(caption)


def check_markers(caption: str, grid: Grid) -> str | None:
    """None when the caption names every panel of `grid` once, in order, in one style;
    else what is wrong (a caption with no markers at all is fine: a plain description)."""
    found = find_markers(caption)
    if not found:
        return None
    for style in MARKER_STYLES:
        try:
            expected = panel_markers(grid, style)  # type: ignore[arg-type]
        except ValueError:
            continue
        normalised, wanted = [_normalise(m) for m in found], [_normalise(m) for m in expected]
        if set(normalised) & set(wanted):
            if normalised == wanted:
                empty = empty_markers(caption)
                return f"empty panel(s): {' '.join(empty)} with no description" if empty else None
            missing = [m for m, n in zip(expected, wanted) if n not in normalised]
            if missing and [n for n in wanted if n in normalised] == normalised:
                return f"missing marker(s) {' '.join(missing)} of the {grid} grid"
            return f"markers {' '.join(found)} do not match the {grid} grid ({' '.join(expected)})"
    return f"markers {' '.join(found)} do not match the {grid} grid"


def empty_markers(caption: str) -> list[str]:
    """The markers with nothing but separators between them and the next marker (or the end)."""
    parts = MARKER_PATTERN.split(caption)  # text before the first marker, then the text after each
    return [m for m, text in zip(find_markers(caption), parts[1:]) if not text.strip(" ;,.\n")]


def _normalise(marker: str) -> str:
    """[IMAGE1] and [IMAGE 1], [SCENE1] and [SCENE-1] are the same marker."""
    return re.sub(r"[\s-]", "", marker)
