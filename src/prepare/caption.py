"""Write IC-LoRA captions with a vision-language model: a summary, then one line per panel.

    python -m iclora.prepare caption --data_dir data/tryon --grid 1x3 \
        --model_id Qwen/Qwen2.5-VL-3B-Instruct --marker_style image

For every composite in `data_dir` without a caption (all of them with --overwrite) the model
is asked once about the whole composite (--summary_prompt) and once about each panel crop
(--panel_prompt); the answers become `<name>.txt`:

    <summary>; [IMAGE 1] <panel 1>; [IMAGE 2] <panel 2>; ...

so every caption carries every marker in order, whatever the model writes. A composite with a
panel the model answers nothing for gets no caption (one warning line names it): a bare
marker would train that panel on no words. Both prompts are
templates: {grid}, {num_panels}, {rows}, {cols} and, in the panel prompt, {index} (from 1)
and {marker} are filled in. Any chat-template model that `AutoModelForImageTextToText`
loads works (Qwen2-VL / Qwen2.5-VL / Qwen3-VL, LLaVA / JoyCaption, Gemma 3, SmolVLM, ...);
--load_in_4bit (bitsandbytes, CUDA) fits a 7B model in ~6 GB; on a machine without CUDA it
runs on the CPU in float32.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from PIL import Image

from ..data import IMAGE_SUFFIXES
from ..panels import Grid, split_panels
from .compose import atomic_write, natural_key, read_panel
from .markers import MarkerStyle, panel_markers, unified_caption

SUMMARY_PROMPT = (
    "This image is a {rows}x{cols} grid of {num_panels} panels that belong together. In one sentence, "
    "say what the set shows and what the panels have in common. Do not describe each panel."
)
PANEL_PROMPT = (
    "This is panel {index} of {num_panels} of a set. Describe it in one sentence: the subject, its pose "
    "or view, clothing, colours, background and lighting."
)


@dataclass
class CaptionConfig:
    """Caption composites with a vision-language model (summary + one line per panel)."""

    data_dir: str
    """Folder of composites (png/jpg/jpeg/webp); captions are written beside them as .txt."""
    grid: str = "2x2"
    """Panel layout ROWSxCOLS of the composites."""
    model_id: str = "Qwen/Qwen2.5-VL-3B-Instruct"
    """A hub id or local folder of a chat-template vision-language model (AutoModelForImageTextToText)."""
    marker_style: MarkerStyle = "image"
    """Caption markers: image ([IMAGE 1] ...), position ([TOP-LEFT] ...), scene ([SCENE-1] ...)."""
    summary_prompt: str = SUMMARY_PROMPT
    """What the model is asked about the whole composite ({grid}, {num_panels}, {rows}, {cols} are filled in)."""
    panel_prompt: str = PANEL_PROMPT
    """What the model is asked about each panel (also {index}, from 1, and {marker})."""
    prompt_file: Optional[str] = None
    """A text file whose first paragraph replaces --summary_prompt and second --panel_prompt (split at a blank line)."""
    overwrite: bool = False
    """Caption composites that already have a caption (else they are skipped)."""
    max_new_tokens: int = 96
    """Most tokens the model writes per answer."""
    load_in_4bit: bool = False
    """Load the model 4-bit (bitsandbytes NF4; CUDA only)."""
    device: Optional[str] = None
    """Where the model runs (default: cuda when available, else cpu)."""

    def __post_init__(self) -> None:
        grid = Grid.parse(self.grid)
        self.grid = str(grid)  # '2×2' or ' 2X2' is read as 2x2
        panel_markers(grid, self.marker_style)
        if self.prompt_file is not None:
            path = Path(self.prompt_file)
            if not path.is_file():
                raise ValueError(f"--prompt_file {path}: no such file")
            parts = [p.strip() for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()]
            if len(parts) != 2:
                raise ValueError(f"--prompt_file {path}: expected two paragraphs (summary prompt, panel prompt), got {len(parts)}")
            self.summary_prompt, self.panel_prompt = parts
        for flag in ("summary_prompt", "panel_prompt"):
            try:
                getattr(self, flag).format(grid=grid, num_panels=1, rows=1, cols=1, index=1, marker="[M]")
            except (KeyError, IndexError, ValueError) as error:
                raise ValueError(f"--{flag}: bad template ({error.__class__.__name__}: {error}); "
                                 "placeholders are {grid} {num_panels} {rows} {cols} {index} {marker}") from None
        if self.max_new_tokens < 1:
            raise ValueError(f"--max_new_tokens must be at least 1, got {self.max_new_tokens}")


@dataclass
class CaptionResult:
    written: list[Path] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # image name -> why
    empty: dict[str, list[str]] = field(default_factory=dict)  # image name -> the markers the model left empty


class VisionLanguageModel:
    """A chat-template VLM through transformers: `ask(image, question) -> answer`."""

    def __init__(self, model_id: str, load_in_4bit: bool, device: str | None):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from ..cpu import set_cpu_threads
        from ..hub import model_source

        cuda = torch.cuda.is_available()
        self.device = device or ("cuda" if cuda else "cpu")
        options = {"dtype": torch.bfloat16 if self.device.startswith("cuda") else torch.float32}
        if load_in_4bit:
            if not cuda:
                raise ValueError("--load_in_4bit needs a CUDA GPU (bitsandbytes); without one the model runs in float32")
            from transformers import BitsAndBytesConfig

            options["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
            options["device_map"] = self.device
        source = model_source(model_id)
        set_cpu_threads(model_id, self.device)
        self.processor = AutoProcessor.from_pretrained(source)
        self.model = AutoModelForImageTextToText.from_pretrained(source, **options).eval()
        if not load_in_4bit:
            self.model.to(self.device)

    def ask(self, image: Image.Image, question: str, max_new_tokens: int) -> str:
        import torch

        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = self.processor(images=[image], text=[text], return_tensors="pt").to(self.device)
        with torch.no_grad():
            output = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        return self.processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]


def clean(answer: str) -> str:
    """One line, no markers of its own and no separators that would split the caption."""
    from .markers import MARKER_PATTERN

    text = MARKER_PATTERN.sub("", answer.replace("\ufffd", ""))
    text = " ".join(text.replace(";", ",").split())
    return text.strip(" ,.") + ("." if text.strip(" ,.") else "")


def caption_image(model, image: Image.Image, grid: Grid, markers: list[str], cfg: CaptionConfig) -> tuple[str, list[str]]:
    """(the caption, the markers of panels the model answered nothing for). A caption with
    an empty panel line is not written: a bare marker would train that panel on no words. An
    empty summary is left out (the panel lines still say everything)."""
    fields = {"grid": str(grid), "num_panels": grid.num_panels, "rows": grid.rows, "cols": grid.cols}
    summary = clean(model.ask(image, cfg.summary_prompt.format(**fields, index=0, marker=""), cfg.max_new_tokens))
    panels = [clean(model.ask(panel, cfg.panel_prompt.format(**fields, index=i + 1, marker=markers[i]),
                              cfg.max_new_tokens))
              for i, panel in enumerate(split_panels(image, grid))]
    return unified_caption(summary, panels, markers), [m for m, text in zip(markers, panels) if not text]


def caption(cfg: CaptionConfig, model=None) -> CaptionResult:
    """Caption every composite of cfg.data_dir that needs it; `model` replaces the loaded VLM."""
    folder = Path(cfg.data_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"--data_dir {folder}: no such folder")
    grid = Grid.parse(cfg.grid)
    markers = panel_markers(grid, cfg.marker_style)
    images = sorted((p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
                    key=lambda p: natural_key(p.name))
    if not images:
        raise ValueError(f"--data_dir {folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    result = CaptionResult()
    todo = []
    for path in images:
        if path.with_suffix(".txt").is_file() and not cfg.overwrite:
            result.skipped[path.name] = "has a caption (--overwrite replaces it)"
        else:
            todo.append(path)
    if todo and model is None:
        model = VisionLanguageModel(cfg.model_id, cfg.load_in_4bit, cfg.device)
    for path in todo:
        try:
            image = read_panel(path)
        except ValueError as error:
            result.skipped[path.name] = str(error)
            continue
        text, empty = caption_image(model, image, grid, markers, cfg)
        if empty:
            result.empty[path.name] = empty
            continue
        target = path.with_suffix(".txt")
        atomic_write(target, lambda tmp: tmp.write_text(text + "\n", encoding="utf-8"))
        result.written.append(target)
        print(f"{target.name}: {text[:100]}{'...' if len(text) > 100 else ''}")
    return result


def report(result: CaptionResult) -> None:
    for name, why in result.skipped.items():
        print(f"skipped {name}: {why}")
    for name, markers in result.empty.items():
        print(f"warning: no caption for {name}: the model answered nothing for {' '.join(markers)} "
              "(check the image, or try another --model_id or prompt)")
    print(f"wrote {len(result.written)} caption(s); skipped {len(result.skipped)}"
          + (f"; {len(result.empty)} left without one (the model answered nothing for a panel)" if result.empty else ""))
