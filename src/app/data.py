"""The Data tab's work, without any web code: the dry run's checks (prepare/check.py) for a
folder and for each composite, captions edited in place (written under a temporary name and
renamed), and composites built from photo sets by the compose command's own code.
"""

from __future__ import annotations

import contextlib
import functools
import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..backends.lora_files import atomic_write_text
from ..data import IMAGE_SUFFIXES, Record, read_caption
from ..panels import Grid
from ..prepare.check import check_encoder, check_training_data, load_tokenizers, print_report
from ..prepare.markers import check_markers, find_markers
from .inpaint import draw_panels
from .workspace import Workspace, command_line, parse_flags

MAX_CAPTION_CHARS = 20_000


@dataclass
class CaptionCheck:
    caption: str | None  # None: no caption file
    tokens: list[str]  # one line per text encoder
    markers: str

    def text(self) -> str:
        return "\n".join([*self.tokens, self.markers])


def list_images(ws: Workspace, data_dir: str) -> list[str]:
    folder = ws.path(data_dir, "--data_dir", must_exist=True)
    if not folder.is_dir():
        raise ValueError(f"--data_dir {data_dir}: not a folder")
    return sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def image_path(ws: Workspace, data_dir: str, name: str) -> Path:
    """A composite of the data folder, by its file name alone."""
    if not name or Path(name).name != name or name in (".", ".."):
        raise ValueError(f"image {name!r}: a file name of the data folder is expected, not a path")
    path = ws.path(f"{data_dir.rstrip('/')}/{name}", "image", must_exist=True)
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise ValueError(f"image {name}: not an image ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return path


def folder_report(ws: Workspace, data_dir: str, grid: str, backend: str, model_id: str, image_size: int | None) -> str:
    """The training script's --dry_run report for the folder (its one error line when the
    folder would be refused)."""
    argv = ["--data_dir", str(ws.path(data_dir, "--data_dir", must_exist=True)), "--grid", grid or "2x2",
            "--backend", backend, "--dry_run"]
    if model_id.strip():
        argv += ["--model_id", ws.model(model_id, "--model_id")]
    if image_size:
        argv += ["--image_size", str(int(image_size))]
    from .train import training_defaults, script

    cfg = parse_flags(_training_config(), argv, prog=script(backend).name, defaults=training_defaults(backend))
    report = check_training_data(cfg)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_report(report, cfg)
    return out.getvalue().replace(str(ws.root) + "/", "")


def _training_config():
    from ..training.config import TrainConfig

    return TrainConfig


@functools.lru_cache(maxsize=4)
def tokenizers(backend: str, model_id: str, max_token_length: int | None):
    return load_tokenizers(backend, model_id, max_token_length)


def check_caption(caption: str | None, grid: str, backend: str, model_id: str, name: str = "caption") -> CaptionCheck:
    """The dry run's per-caption checks: tokens read by each text encoder (and what is cut),
    and whether the caption's panel markers match the grid."""
    g = Grid.parse(grid or "2x2")
    if caption is None:
        return CaptionCheck(None, [], "no caption file: training refuses the folder until it has one")
    from .train import training_defaults

    model = model_id.strip() or training_defaults(backend)["model_id"]
    record = Record(Path(name), caption, (0, 0), (0, 0))  # check_encoder reads the caption and name only
    lines = []
    for encoder, tokenizer, limit in tokenizers(backend, model, None):
        result = check_encoder(encoder, tokenizer, limit, [record])
        count = result.lengths[name]
        cut = f"; cut, loses: {result.cut[name][:80]!r}" if name in result.cut else ""
        lines.append(f"{encoder}: {count} tokens of {limit}{cut}")
    problem = check_markers(caption, g)
    markers = problem or (f"markers match the {g} grid" if find_markers(caption) else "no panel markers (a plain caption)")
    return CaptionCheck(caption, lines, markers)


def read_image_caption(ws: Workspace, data_dir: str, name: str) -> str | None:
    caption_file = image_path(ws, data_dir, name).with_suffix(".txt")
    if not caption_file.is_file():
        return None
    try:
        return read_caption(caption_file)
    except ValueError as error:
        raise ValueError(f"{caption_file.name}: {error}") from None


def show_image(ws: Workspace, data_dir: str, name: str, grid: str) -> Image.Image:
    """The composite with its panel grid drawn over it."""
    with Image.open(image_path(ws, data_dir, name)) as image:
        return draw_panels(image, Grid.parse(grid or "2x2"), "")


def save_caption(ws: Workspace, data_dir: str, name: str, text: str) -> Path:
    """Write the caption beside its composite: temporary name, then rename."""
    caption = (text or "").strip()
    if not caption:
        raise ValueError(f"caption of {name}: empty (training needs one for every composite)")
    if len(caption) > MAX_CAPTION_CHARS:
        raise ValueError(f"caption of {name}: {len(caption)} characters, more than {MAX_CAPTION_CHARS}")
    target = image_path(ws, data_dir, name).with_suffix(".txt")
    atomic_write_text(caption + "\n", target)
    return target


@dataclass
class ComposeSettings:
    input_dir: str = ""
    output_dir: str = ""
    grid: str = "2x2"
    panel_width: int | None = None
    panel_height: int | None = None
    fit: str = "letterbox"
    background: str = "white"
    grouping: str = "folders"
    order: str = ""
    marker_style: str = "image"
    format: str = "png"
    overwrite: bool = False


def compose_folder(ws: Workspace, s: ComposeSettings) -> tuple[str, str]:
    """(the compose command's report, the command line) for these settings."""
    from ..prepare.compose import ComposeConfig, compose, report

    argv = ["--input_dir", str(ws.path(s.input_dir, "--input_dir", must_exist=True)),
            "--output_dir", str(ws.path(s.output_dir, "--output_dir")), "--grid", s.grid or "2x2",
            "--fit", s.fit, "--background", s.background, "--grouping", s.grouping,
            "--marker_style", s.marker_style, "--format", s.format]
    for name in ("panel_width", "panel_height"):
        if getattr(s, name):
            argv += [f"--{name}", str(int(getattr(s, name)))]
    if s.order.strip():
        argv += ["--order", *s.order.split()]
    if s.overwrite:
        argv += ["--overwrite"]
    prog = "python -m iclora.prepare compose"
    cfg = parse_flags(ComposeConfig, argv, prog=prog)
    result = compose(cfg)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        report(result, cfg)
    return out.getvalue().replace(str(ws.root) + "/", ""), command_line("-m iclora.prepare compose", argv)
