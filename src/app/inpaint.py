"""The Inpaint tab's work, without any web code: the page's settings become the inference
command line's flags, parsed and checked by the command line's own code, and the images come
from the same functions `run()` calls (check_inputs -> load_pipeline -> generate ->
write_outputs). The only addition is that loaded pipelines are kept between clicks.

    settings + uploaded composite -> <output>/inputs/<name>  (the input the flags name)
                                  -> <output>/<lora>/<stem>_0.png ... <stem>_comparison.png
"""

from __future__ import annotations

import re
import shutil
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..data import IMAGE_SUFFIXES
from ..panels import Grid, panel_box, parse_panels
from .train import SRC, script as script_file
from .workspace import Workspace, command_line, parse_flags

LORA_FILE = "pytorch_lora_weights.safetensors"
KEPT_PIPELINES = 2  # two LoRAs side by side stay loaded


@dataclass
class InpaintSettings:
    """What the Inpaint tab sets; blank (None / '') means the command line's default."""

    lora: str = "none"  # a LoRA folder or .safetensors file of the workspace, or 'none'
    prompt: str = ""
    panels: str = "2 3"  # --panels_to_inpaint: indices (row-major from 0) or 'all'
    backend: str = "sdxl"
    base_model: str = ""  # default: the LoRA's recorded base
    grid: str = ""  # default: the LoRA's recorded grid
    strength: float = 1.0
    feather: int = 0  # --gradient_width with --use_gradient_mask; 0 = hard panel edges
    steps: int | None = None
    guidance: float | None = None
    seed: int | None = 42
    num_images: int = 1
    negative_prompt: str = ""
    output_dir: str = "inpaint_output"


@dataclass
class InpaintResult:
    files: list[Path]
    outputs: list[Path]  # <stem>_<i>.png
    comparison: Path
    command: str  # the equivalent command line
    extra: dict = field(default_factory=dict)


def script_defaults(backend: str) -> dict:
    """The defaults the backend's inference script gives the shared config."""
    from ..backends.registry import backend_spec

    return backend_spec(backend).infer_defaults


def safe_name(name: str) -> str:
    """An uploaded file's name as a plain file name of ours (no folders, no odd characters)."""
    stem, suffix = Path(Path(name).name).stem, Path(name).suffix.lower()
    stem = re.sub(r"[^\w.-]+", "_", stem).strip("._") or "composite"
    return stem + (suffix if suffix in IMAGE_SUFFIXES else ".png")


def store_upload(upload: str | Path, folder: Path, name: str | None = None) -> Path:
    """Copy an uploaded file into `folder` (inside the output folder) byte for byte, so the
    command line reads exactly the file the page was given."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / safe_name(name or Path(upload).name)
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.copyfile(upload, tmp)
    tmp.replace(target)
    return target


def compose_panels(uploads: list, grid: str, out: Path) -> Path:
    """Separate panel images, in the order given, as one composite, placed row-major the way
    the compose command places them (each letterboxed on white into a panel the size of the
    first); panels not given stay white, for the model to fill. Written to <out>/inputs/."""
    from ..prepare.compose import ComposeConfig, atomic_write, compose_group

    g = Grid.parse(grid or "2x2")
    if not uploads:
        raise ValueError("no panel images given")
    if len(uploads) > g.num_panels:
        raise ValueError(f"{len(uploads)} panel images, the {g} grid has {g.num_panels} panels")
    folder = out / "inputs" / "panels"
    stored = [store_upload(u, folder, f"{i}_{Path(u).name}") for i, u in enumerate(uploads)]
    try:
        with Image.open(stored[0]) as first:
            width, height = first.size
    except OSError as error:
        raise ValueError(f"panel image {Path(uploads[0]).name}: unreadable ({error.__class__.__name__})") from None
    cfg = ComposeConfig(input_dir=str(folder), output_dir=str(out), grid=str(g), panel_width=width, panel_height=height)
    composite = compose_group(stored, cfg, g)  # an unreadable panel: ValueError naming it
    target = out / "inputs" / f"{stored[0].stem.split('_', 1)[-1]}_composite.png"
    atomic_write(target, lambda tmp: composite.save(tmp, format="PNG"))
    return target


def lora_label(ws: Workspace, lora: str) -> str:
    """The output sub-folder of one LoRA: 'final_model', 'checkpoint-20', 'base' for none."""
    path = Path(lora.strip())
    if str(path).lower() in ("", ".", "none"):
        return "base"
    name = path.stem if path.suffix == ".safetensors" else path.name
    return re.sub(r"[^\w.-]+", "_", name).strip("._") or "lora"


def inference_argv(ws: Workspace, s: InpaintSettings, image: Path | None, mask: Path | None, out: Path) -> list[str]:
    """The inference command line's flags for these settings (workspace paths made absolute)."""
    lora = s.lora.strip() or "none"
    argv = ["--lora_path", "none" if lora.lower() == "none" else str(ws.path(lora, "--lora_path", must_exist=True))]
    argv += ["--backend", s.backend, "--prompt", s.prompt, "--output_dir", str(out), "--save_comparison"]
    if image is not None:
        argv += ["--input_image", str(image)]
    if mask is not None:
        argv += ["--mask_image", str(mask)]
    elif s.panels.split():
        argv += ["--panels_to_inpaint", *s.panels.split()]
    else:
        raise ValueError("--panels_to_inpaint: no panel chosen (click the panels to regenerate, or paint a mask)")
    if s.base_model.strip():
        argv += ["--base_model", ws.model(s.base_model, "--base_model")]
    if s.grid.strip():
        argv += ["--grid", s.grid.strip()]
    argv += ["--strength", str(s.strength), "--num_images", str(int(s.num_images))]
    if s.feather:
        argv += ["--use_gradient_mask", "--gradient_width", str(int(s.feather))]
    if s.steps:
        argv += ["--num_inference_steps", str(int(s.steps))]
    if s.guidance is not None:
        argv += ["--guidance_scale", str(s.guidance)]
    if s.seed is not None:
        argv += ["--seed", str(int(s.seed))]
    if s.negative_prompt.strip():
        argv += ["--negative_prompt", s.negative_prompt]
    return argv


class Pipelines:
    """Loaded pipelines by everything that loading depends on, the newest KEPT_PIPELINES
    kept: clicking again (or comparing two checkpoints) does not reload the base. A LoRA
    file rewritten since (a run still training into it) is loaded again."""

    def __init__(self):
        self.cache: OrderedDict = OrderedDict()
        self.lock = threading.Lock()  # one inference at a time: they share the loaded models

    def key(self, plan) -> tuple:
        cfg = plan.cfg
        stamp = None
        if cfg.lora_path.lower() != "none":
            from ..backends.lora_files import resolve_lora_file

            file = resolve_lora_file(cfg.lora_path)
            stamp = tuple(p.stat().st_mtime_ns for p in file.parent.glob("*.safetensors"))
        return (cfg.backend, plan.base_model, plan.conditioning, plan.context_timestep, plan.max_token_length,
                cfg.lora_path, stamp, cfg.variant, cfg.dtype, cfg.quantize, cfg.cpu_offload, cfg.compile)

    def get(self, plan):
        from ..inference.inpaint import load_pipeline

        key = self.key(plan)
        if key in self.cache:
            self.cache.move_to_end(key)
            return self.cache[key]
        while len(self.cache) >= KEPT_PIPELINES:
            self.cache.popitem(last=False)
        self.cache[key] = load_pipeline(plan)
        return self.cache[key]


PIPELINES = Pipelines()


def run_inpaint(ws: Workspace, s: InpaintSettings, upload: str | Path | None, mask: np.ndarray | None = None,
                subfolder: str | None = None) -> InpaintResult:
    """Inpaint the uploaded composite (None: a whole set from text, panels 'all'). `mask`:
    a painted mask (H, W), nonzero = regenerate, used instead of the panels."""
    from ..inference.inpaint import check_inputs, generate, resolved_settings, write_outputs

    out = ws.path(s.output_dir, "output folder")
    image = store_upload(upload, out / "inputs") if upload else None
    mask_file = None
    if mask is not None:
        if image is None:
            raise ValueError("a painted mask needs a composite: drop one first")
        mask_file = out / "inputs" / f"{image.stem}_mask.png"
        Image.fromarray(np.where(mask > 0, 255, 0).astype(np.uint8), "L").save(mask_file)
    target = out / (subfolder or lora_label(ws, s.lora))
    argv = inference_argv(ws, s, image, mask_file, target)
    defaults = script_defaults(s.backend)  # an unknown backend: one line naming the choices
    script = "src/" + script_file(s.backend, "infer").relative_to(SRC).as_posix()
    cfg = parse_flags(_infer_config(), argv, prog=Path(script).name, defaults=defaults)
    with PIPELINES.lock:
        plan = check_inputs(cfg)
        backend, pipe = PIPELINES.get(plan)
        outputs, seeds = generate(plan, backend, pipe)
        files = write_outputs(plan, outputs, seeds, resolved_settings(plan, backend))
    images = [target / f"{plan.stem}_{i}.png" for i in range(len(outputs))]
    return InpaintResult(files, images, target / f"{plan.stem}_comparison.png", command_line(script, argv),
                         {"seeds": seeds, "panels": plan.panels})


def run_compare(ws: Workspace, s: InpaintSettings, other_lora: str, upload, mask=None) -> list[InpaintResult]:
    """The same input, settings and seeds through two LoRAs (two checkpoints of a run, say)."""
    first, second = lora_label(ws, s.lora), lora_label(ws, other_lora)
    if first == second:
        first, second = f"a_{first}", f"b_{second}"
    other = InpaintSettings(**{**s.__dict__, "lora": other_lora})
    return [run_inpaint(ws, s, upload, mask, first), run_inpaint(ws, other, upload, mask, second)]


def _infer_config():
    from ..inference.config import InferConfig

    return InferConfig


def painted_mask(value) -> np.ndarray:
    """The strokes of an ImageMask value as an (H, W) array, nonzero = regenerate."""
    layers = (value or {}).get("layers") or []
    if not layers:
        raise ValueError("the painted mask is empty: paint over the panels to regenerate")
    alpha = np.zeros(np.asarray(layers[0]).shape[:2], dtype=np.uint8)
    for layer in layers:
        layer = np.asarray(layer)
        alpha = np.maximum(alpha, layer[..., 3] if layer.ndim == 3 and layer.shape[2] == 4 else layer.max(-1))
    if not alpha.any():
        raise ValueError("the painted mask is empty: paint over the panels to regenerate")
    return alpha


# ---- clicking panels ------------------------------------------------------------------------


def panel_at(x: float, y: float, width: int, height: int, grid: Grid) -> int:
    """The panel under pixel (x, y) of a width x height composite."""
    for index in range(grid.num_panels):
        left, top, right, bottom = panel_box(index, grid, width, height)
        if left <= x < right and top <= y < bottom:
            return index
    raise ValueError(f"point ({x}, {y}) is outside the {width}x{height} composite")


def toggle_panel(panels: str, index: int, grid: Grid) -> str:
    """The --panels_to_inpaint text with panel `index` added or removed."""
    words = panels.split()
    chosen = [] if words in ([], ["all"]) else parse_panels(words, grid)
    chosen = sorted(set(chosen) ^ {index})
    return " ".join(map(str, chosen))


def recorded_grid(ws: Workspace, lora: str) -> str | None:
    """The grid a LoRA was trained on (its iclora_config.json), None when unknown."""
    from ..backends.lora_files import read_metadata

    if lora.strip().lower() in ("", "none"):
        return None
    return read_metadata(ws.path(lora, "--lora_path", must_exist=True)).get("grid")


def draw_panels(image: Image.Image, grid: Grid, panels: str) -> Image.Image:
    """The composite with its panel grid drawn over, each panel numbered, the panels to
    regenerate shaded red."""
    grid = Grid.parse(grid)
    words = panels.split()
    hidden = set(range(grid.num_panels)) if words == ["all"] else set(parse_panels(words, grid) if words else [])
    sheet = image.convert("RGB")
    shade = Image.new("RGB", sheet.size, (220, 40, 40))
    overlay = sheet.copy()
    draw = ImageDraw.Draw(overlay)
    line = max(1, min(sheet.size) // 128)
    for index in range(grid.num_panels):
        box = panel_box(index, grid, *sheet.size)
        if index in hidden:
            overlay.paste(Image.blend(sheet.crop(box), shade.crop(box), 0.55), box[:2])
        draw.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), outline=(255, 255, 0), width=line)
        draw.text((box[0] + 3 * line, box[1] + 2 * line), str(index), fill=(255, 255, 0))
    return overlay


def list_loras(ws: Workspace) -> list[str]:
    """Every LoRA folder of the workspace (final models and checkpoints), the newest first,
    then 'none' (the base model alone)."""
    found = [f for f in ws.folders(containing=LORA_FILE) if (ws.root / f / LORA_FILE).is_file()]
    return [*sorted(found, key=lambda f: -(ws.root / f / LORA_FILE).stat().st_mtime_ns), "none"]
