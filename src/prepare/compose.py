"""Separate panel photos -> IC-LoRA composites with unified captions.

    python -m iclora.prepare compose --input_dir photos/ --output_dir data/tryon \
        --grid 1x3 --panel_width 512 --panel_height 768 --fit letterbox --marker_style image

Groups are sub-folders of `input_dir` (`photos/shirt1/front.jpg back.jpg model.jpg`) or,
with `--grouping names`, files sharing a stem before the last `_` or `-`
(`shirt1_0.jpg shirt1_1.jpg shirt1_2.jpg`). Each group becomes `output_dir/<group>.png`:
its panels in name order (or `--order`), each scaled to the panel size without stretching
(letterboxed on `--background`, or centre-cropped), placed row-major. Captions, all
optional: `<panel>.txt` beside a panel, and a summary in `<group>.txt` beside the folder
(or `caption.txt` inside it); they become `<group>.txt` with one marker per panel.
Every group that cannot be composed is reported with the reason and skipped.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from PIL import Image, ImageColor, ImageOps, UnidentifiedImageError

from ..data import IMAGE_SUFFIXES, read_caption
from ..panels import Grid, panel_box
from .markers import MarkerStyle, panel_markers, strip_marker, unified_caption

SUMMARY_NAME = "caption.txt"


@dataclass
class ComposeConfig:
    """Compose separate panel images into IC-LoRA composites."""

    input_dir: str
    """Folder of groups: one sub-folder per composite, or files named GROUP_PANEL.ext (--grouping names)."""
    output_dir: str
    """Where the composites (.png/.jpg) and their captions (.txt) are written."""
    grid: str = "2x2"
    """Panel layout ROWSxCOLS (2x2, 1x2, 1x3, 2x1, ...); panels fill it row-major."""
    panel_width: int = 512
    """Width of one panel in pixels."""
    panel_height: Optional[int] = None
    """Height of one panel in pixels (default: panel_width)."""
    fit: Literal["letterbox", "crop"] = "letterbox"
    """letterbox: the whole photo, padded with --background; crop: fill the panel, centre-cropped."""
    background: str = "white"
    """Letterbox colour (a name or #rrggbb)."""
    grouping: Literal["folders", "names"] = "folders"
    """folders: each sub-folder is a group; names: files GROUP_PANEL.ext (or GROUP-PANEL.ext) in input_dir."""
    order: list[str] = field(default_factory=list)
    """Panel names in grid order (file stems in a folder, the PANEL part with --grouping names); default: sorted by name."""
    marker_style: MarkerStyle = "image"
    """Caption markers: image ([IMAGE 1] ...), position ([TOP-LEFT] ...), scene ([SCENE-1] ...)."""
    format: Literal["png", "jpg"] = "png"
    """Image format of the composites."""
    overwrite: bool = False
    """Replace composites that already exist in output_dir (else they are skipped)."""

    def __post_init__(self) -> None:
        grid = Grid.parse(self.grid)
        self.grid = str(grid)  # '2×2' or ' 2X2' is read as 2x2
        if self.panel_height is None:
            self.panel_height = self.panel_width
        for name in ("panel_width", "panel_height"):
            if getattr(self, name) < 8:
                raise ValueError(f"--{name} must be at least 8, got {getattr(self, name)}")
        try:
            ImageColor.getrgb(self.background)
        except ValueError:
            raise ValueError(f"--background: not a colour: {self.background!r}") from None
        if self.order:
            if len(self.order) != grid.num_panels:
                raise ValueError(f"--order names {len(self.order)} panels, the {grid} grid has {grid.num_panels}")
            if len(set(self.order)) != len(self.order):
                raise ValueError(f"--order: duplicate names in {' '.join(self.order)}")
        panel_markers(grid, self.marker_style)  # position markers exist for grids up to 3x3


@dataclass
class Group:
    name: str
    panels: dict[str, Path]  # panel name -> image file
    summary_files: list[Path]  # where a summary caption may be


@dataclass
class ComposeResult:
    written: list[Path] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # group -> why
    uncaptioned: list[str] = field(default_factory=list)  # written without any caption
    partly_captioned: dict[str, list[str]] = field(default_factory=dict)  # written without a caption: panels lacking one


def natural_key(text: str) -> list:
    """'img2' before 'img10'."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", text)]


def find_groups(folder: Path, grouping: str) -> tuple[list[Group], dict[str, str]]:
    """Groups of panel images, and the stray files that belong to none (name -> why)."""
    groups, strays = [], {}
    if grouping == "folders":
        for sub in sorted((p for p in folder.iterdir() if p.is_dir()), key=lambda p: natural_key(p.name)):
            panels = {p.stem: p for p in sub.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES}
            groups.append(Group(sub.name, panels, [sub / SUMMARY_NAME, folder / f"{sub.name}.txt"]))
        return groups, strays
    found: dict[str, dict[str, Path]] = defaultdict(dict)
    for path in sorted(folder.iterdir(), key=lambda p: natural_key(p.name)):
        if not (path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES):
            continue
        match = re.fullmatch(r"(.+)[_-]([^_-]+)", path.stem)
        if not match:
            strays[path.name] = "name is not GROUP_PANEL (e.g. shirt1_0.jpg)"
            continue
        found[match.group(1)][match.group(2)] = path
    for name in sorted(found, key=natural_key):
        groups.append(Group(name, found[name], [folder / f"{name}.txt"]))
    return groups, strays


def order_panels(group: Group, grid: Grid, order: list[str]) -> list[Path]:
    """The group's images in grid order; ValueError says why the group does not fit."""
    if order:
        missing = [name for name in order if name not in group.panels]
        extra = sorted(set(group.panels) - set(order), key=natural_key)
        if missing or extra:
            why = [f"no panel {', '.join(missing)}"] if missing else []
            why += [f"unexpected panel {', '.join(extra)}"] if extra else []
            raise ValueError(f"{'; '.join(why)} (--order {' '.join(order)})")
        return [group.panels[name] for name in order]
    if len(group.panels) != grid.num_panels:
        raise ValueError(f"{len(group.panels)} panel images, the {grid} grid needs {grid.num_panels}")
    return [group.panels[name] for name in sorted(group.panels, key=natural_key)]


def fit_panel(image: Image.Image, width: int, height: int, fit: str, background: tuple[int, int, int]) -> Image.Image:
    """`image` at width x height, its aspect ratio kept: letterboxed or centre-cropped."""
    if fit == "crop":
        return ImageOps.fit(image, (width, height), Image.Resampling.LANCZOS)
    return ImageOps.pad(image, (width, height), Image.Resampling.LANCZOS, color=background)


def read_panel(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            # Phone photos store their rotation in EXIF: apply it, or portraits lie on their side.
            return ImageOps.exif_transpose(image).convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"unreadable image {path.name} ({error.__class__.__name__})") from None


def read_text(path: Path) -> str:
    """A caption file as training reads it (UTF-8, a BOM dropped)."""
    try:
        return read_caption(path)
    except ValueError:
        raise ValueError(f"caption {path.name} is not UTF-8 text") from None


def compose_group(paths: list[Path], cfg: ComposeConfig, grid: Grid) -> Image.Image:
    width, height = cfg.panel_width * grid.cols, cfg.panel_height * grid.rows
    background = ImageColor.getrgb(cfg.background)[:3]
    canvas = Image.new("RGB", (width, height), background)
    for index, path in enumerate(paths):
        left, top, right, bottom = panel_box(index, grid, width, height)
        canvas.paste(fit_panel(read_panel(path), right - left, bottom - top, cfg.fit, background), (left, top))
    return canvas


def group_caption(group: Group, paths: list[Path], markers: list[str]) -> tuple[str | None, list[str]]:
    """The unified caption from the group's caption files, and the panels lacking one. No
    caption when it has no caption file at all, or when some panels have one and others not:
    a bare marker would teach the model an empty panel, and leaving it out would shift the
    panels after it. A summary alone is a caption without markers."""
    summary = next((read_text(p) for p in group.summary_files if p.is_file()), None)
    panel_files = [p.with_suffix(".txt") for p in paths]
    panels = [read_text(p) if p.is_file() else "" for p in panel_files]
    lacking = [path.name for path, text in zip(paths, panels) if not strip_marker(text)]
    if not any(panels):
        return summary or None, []
    if lacking:
        return None, lacking
    return unified_caption(summary or "", panels, markers), []


def atomic_write(path: Path, write) -> None:
    """`write(tmp_path)` then rename: an interrupted run leaves no half-written file."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def compose(cfg: ComposeConfig) -> ComposeResult:
    folder, out = Path(cfg.input_dir), Path(cfg.output_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"--input_dir {folder}: no such folder")
    grid = Grid.parse(cfg.grid)
    markers = panel_markers(grid, cfg.marker_style)
    groups, strays = find_groups(folder, cfg.grouping)
    if not groups:
        how = "sub-folders" if cfg.grouping == "folders" else "files named GROUP_PANEL.ext"
        raise ValueError(f"--input_dir {folder}: no groups found ({how}; see --grouping)")
    result = ComposeResult(skipped=dict(strays))
    out.mkdir(parents=True, exist_ok=True)
    for group in groups:
        target = out / f"{group.name}.{cfg.format}"
        if target.exists() and not cfg.overwrite:
            result.skipped[group.name] = f"{target} exists (--overwrite replaces it)"
            continue
        try:
            paths = order_panels(group, grid, cfg.order)
            caption, lacking = group_caption(group, paths, markers)
            image = compose_group(paths, cfg, grid)
        except ValueError as error:
            result.skipped[group.name] = str(error)
            continue
        save_format = "JPEG" if cfg.format == "jpg" else "PNG"
        atomic_write(target, lambda tmp: image.save(tmp, format=save_format, quality=95))
        caption_file = target.with_suffix(".txt")
        if lacking:
            result.partly_captioned[group.name] = lacking
        elif caption is None:
            result.uncaptioned.append(group.name)
        else:
            atomic_write(caption_file, lambda tmp: tmp.write_text(caption + "\n", encoding="utf-8"))
        result.written.append(target)
    return result


def report(result: ComposeResult, cfg: ComposeConfig) -> None:
    for name, why in result.skipped.items():
        print(f"skipped {name}: {why}")
    if result.uncaptioned:
        print(f"no caption files for {len(result.uncaptioned)} composite(s) ({', '.join(result.uncaptioned[:10])}"
              f"{', ...' if len(result.uncaptioned) > 10 else ''}): write them, or run "
              f"python -m iclora.prepare caption --data_dir {cfg.output_dir} --grid {cfg.grid}")
    for name, lacking in result.partly_captioned.items():
        print(f"no caption written for {name}: its panel(s) {', '.join(lacking)} have no caption file "
              "(write them and compose again with --overwrite, or caption the composite)")
    print(f"wrote {len(result.written)} composite(s) to {cfg.output_dir}; skipped {len(result.skipped)}")
