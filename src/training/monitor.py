"""Watching a run: sample sheets, the loss log and plot, experiment trackers.

    start()       trackers; sample sheets of the untrained model (step 0; not again on resume)
    step()        one train_log.jsonl line per optimizer step, tracker scalars, and sample
                  sheets every --validation_every steps
    checkpoint()  loss.png, at every checkpoint
    end()         sample sheets of the final model, loss.png

Sample sheets come from the model being trained, through the shared inference code
(inpaint.check_inputs / generate / write_outputs on the backend's own inpaint pipeline, no
reload), in eval mode with fixed seeds. The RNG state is saved and restored around them, so
a run with samples trains exactly as one without (and resumes exactly).

    output_dir/train_log.jsonl                 step, epoch, loss, lr, seconds, images/s, the
                                               masked and visible panels' unweighted MSE (+ GPU
                                               peak; with --compile the first step's seconds)
    output_dir/loss.png                        the loss per step and a smoothed line
    output_dir/samples/step_000100/            <stem>_0.png, <stem>_comparison.png, ... per image
    output_dir/samples/progress.png            per validation image: input | mask | step 0 | ... | last
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..backends.lora_files import atomic_write_text
from ..data import read_caption
from ..panels import composite_size, inpaint_mask, parse_panels

logger = logging.getLogger(__name__)
LOG_NAME = "train_log.jsonl"
PLOT_NAME = "loss.png"
SAMPLES = "samples"
PROGRESS_COLUMNS = 8  # steps shown in progress.png (first and last always among them)


class Monitor:
    def __init__(self, trainer, records: list) -> None:
        """Checks the validation images and prompts (before any model loads)."""
        self.trainer, self.cfg = trainer, trainer.cfg
        self.output_dir = trainer.output_dir
        self.sources = _validation_sources(self.cfg, records) if self.cfg.validating else []
        self.validation: list[tuple[str, str]] = []  # (input at the training size, prompt)
        self.history: list[dict] = []
        self.last_sampled = -1
        # (prompt, guidance) -> the pipeline's prompt arguments, encoded while the text
        # encoders were on the device for the text cache; None: encoded at each sheet.
        self.prompt_arguments: dict | None = None

    def prompts(self) -> list[tuple[str, float]]:
        """(prompt, guidance scale) of every sample sheet, known before any model loads."""
        return [(prompt, self._guidance()) for _, prompt in self.sources]

    def _guidance(self) -> float:
        guidance = self.cfg.validation_guidance_scale
        return _inference_defaults(self.cfg.backend)["guidance_scale"] if guidance is None else guidance

    # ---- hooks --------------------------------------------------------------------------
    def start(self) -> None:
        cfg, step = self.cfg, self.trainer.global_step
        self.accelerator = self.trainer.accelerator
        self.main = self.accelerator.is_main_process
        if cfg.report_to:
            self.accelerator.init_trackers(self.output_dir.name or "iclora", config=_flat(cfg))
        if self.main:
            self._restore_log(step)
        self.validation = self._validation_inputs()
        # "seconds" continues across a resume: the time the run has trained so far.
        self.started = time.monotonic() - (self.history[-1]["seconds"] if self.history else 0.0)
        self.last_time = time.monotonic()
        if step == 0 and self.validation:
            self.sample()

    def step(self, loss: float, extra: dict | None = None) -> None:
        """`extra`: more fields for this step's train_log.jsonl line."""
        trainer, step = self.trainer, self.trainer.global_step
        now = time.monotonic()
        images = self.cfg.batch_size * self.cfg.gradient_accumulation_steps * self.accelerator.num_processes
        record = {
            "step": step, "epoch": trainer.epoch, "loss": loss, "lr": trainer.lr_scheduler.get_last_lr()[0],
            "seconds": round(now - self.started, 3), "images_per_s": round(images / max(now - self.last_time, 1e-9), 3),
        }
        if torch.cuda.is_available():
            record["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        record.update(extra or {})
        self.last_time = now
        self.history.append(record)
        if self.main:
            with open(self.output_dir / LOG_NAME, "a") as log:
                log.write(json.dumps(record) + "\n")
        if self.cfg.report_to:
            self.accelerator.log({"loss": loss, "lr": record["lr"]}, step=step)
        if self.cfg.validation_every and step % self.cfg.validation_every == 0:
            self.sample()

    def checkpoint(self) -> None:
        if self.main:
            plot_loss([r["step"] for r in self.history], [r["loss"] for r in self.history], self.output_dir / PLOT_NAME)

    def end(self) -> None:
        if self.validation and self.last_sampled != self.trainer.global_step:
            self.sample()
        self.checkpoint()

    # ---- the loss log ---------------------------------------------------------------------
    def _restore_log(self, step: int) -> None:
        """A fresh run starts a new log and sample folder; a resumed one keeps the lines (and
        sample sheets) up to its checkpoint, dropping what the interrupted run did after it."""
        path = self.output_dir / LOG_NAME
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if step and path.is_file():
            self.history = [r for r in map(json.loads, path.read_text().splitlines()) if r["step"] <= step]
        atomic_write_text("".join(json.dumps(r) + "\n" for r in self.history), path)
        if not step:
            shutil.rmtree(self.output_dir / SAMPLES, ignore_errors=True)
        for folder in sorted((self.output_dir / SAMPLES).glob("step_*")):
            if int(folder.name.split("_")[1]) > step:
                shutil.rmtree(folder, ignore_errors=True)

    # ---- sample sheets ------------------------------------------------------------------
    def _validation_inputs(self) -> list[tuple[str, str]]:
        """Each validation image resized to the training size, under samples/inputs/."""
        cfg, trainer = self.cfg, self.trainer
        folder = self.output_dir / SAMPLES / "inputs"
        inputs = []
        for path, prompt in self.sources:
            target = folder / f"{path.stem}.png"
            if self.main:
                with Image.open(path) as image:
                    image = image.convert("RGB")
                size = composite_size(image.width, image.height, cfg.image_size, trainer.grid, trainer.backend.pixel_quantum,
                                      cfg.bucket_by)
                folder.mkdir(parents=True, exist_ok=True)
                image.resize(size, Image.Resampling.LANCZOS).save(target)  # size = (width, height)
            inputs.append((str(target), prompt))
        self.accelerator.wait_for_everyone()
        return inputs

    def _plans(self, folder: Path) -> list:
        from ..inference.config import InferConfig
        from ..inference.inpaint import check_inputs

        cfg = self.cfg
        panels = self._panels()
        guidance = self._guidance()
        plans = []
        for image, prompt in self.validation:
            plan = check_inputs(InferConfig(
                lora_path="none", prompt=prompt, input_image=image, panels_to_inpaint=panels,
                output_dir=str(folder), backend=cfg.backend, base_model=cfg.model_id, grid=cfg.grid,
                conditioning=cfg.conditioning, num_inference_steps=cfg.validation_inference_steps,
                guidance_scale=guidance, seed=cfg.seed, save_comparison=True,
                native_size=True,  # the inputs are at the training size already
            ))
            if self.prompt_arguments is not None:
                device = self.trainer.backend.device
                plan.prompt_arguments = {k: v.to(device) for k, v in self.prompt_arguments[prompt, guidance].items()}
            plans.append(plan)
        return plans

    def _panels(self) -> list[int]:
        grid = self.trainer.grid
        return parse_panels(self.cfg.validation_panels, grid) if self.cfg.validation_panels else list(range(1, grid.num_panels))

    def sample(self) -> None:
        """Sample sheets of the model as it is now, into samples/step_N/ (main process)."""
        step, accelerator = self.trainer.global_step, self.accelerator
        self.last_sampled = step
        # A sharded denoiser runs only with every process at once: all render the same sheets
        # (the same seeds), the main process writes them.
        if self.main or self.trainer.sharded:
            folder = self.output_dir / SAMPLES / f"step_{step:06d}"
            start = time.monotonic()
            sheets = self._render(folder)
        if self.main:
            self._write_progress()
            logger.info("samples at step %d: %s (%.1f s)", step, folder, time.monotonic() - start)
            if self.cfg.report_to:
                for tracker in accelerator.trackers:
                    _log_sheets(tracker, sheets, step)
        accelerator.wait_for_everyone()
        self.last_time = time.monotonic()  # sampling time is not training throughput

    def _render(self, folder: Path) -> list[Image.Image]:
        from ..inference.inpaint import comparison_image, generate, write_outputs

        trainer, accelerator = self.trainer, self.accelerator
        backend = trainer.backend
        pipe = backend.inpaint_pipeline()
        pipe.set_progress_bar_config(disable=True)
        modules = [c for c in pipe.components.values() if isinstance(c, torch.nn.Module)]
        modes = [(m, m.training) for c in modules for m in c.modules()]
        # What a sheet needs on the device: the denoiser (there already) and the VAE (off it
        # with cached latents); the text encoders only when the prompts were not encoded
        # while they were loaded (no text cache: then they never left).
        needed = ["denoiser", "vae"] + ([] if self.prompt_arguments is not None else ["text_encoders"])
        trainer.end_train_segment()
        moved = [part for part in needed if not backend.is_placed(part)]
        cuda = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        sheets = []
        # The context pipelines predict through backend.denoiser, which training may have put in
        # a DDP wrapper, whose forward would wait for processes that do not render: the sheets run
        # the module itself (a sharded one, rendered on every process, gathers its own weights).
        wrapped = backend.denoiser
        backend.denoiser = accelerator.unwrap_model(wrapped)
        try:
            with torch.random.fork_rng(devices=cuda), torch.no_grad(), accelerator.autocast():
                for part in moved:
                    backend.place(part, True)
                for component in modules:
                    component.eval()
                for plan in self._plans(folder):
                    outputs, seeds = generate(plan, backend, pipe)
                    resolved = {"backend": backend.name, "base_model": plan.base_model, "grid": str(plan.grid),
                                "conditioning": backend.conditioning, "panels": plan.panels,
                                "size": list(plan.size), "global_step": trainer.global_step}
                    if self.main:
                        write_outputs(plan, outputs, seeds, resolved)
                    sheets.append(comparison_image(plan, outputs, seeds))
                trainer.record_memory("sample sheet")
        finally:
            backend.denoiser = wrapped
            for part in moved:
                backend.place(part, False)
            for module, training in modes:
                module.training = training
        return sheets

    def _write_progress(self) -> None:
        """progress.png: one row per validation image, input | mask | the output at each
        sampled step, read back from samples/step_*/ (so a resumed run continues it)."""
        root = self.output_dir / SAMPLES
        steps = sorted(root.glob("step_*"))
        if len(steps) > PROGRESS_COLUMNS:
            picks = np.linspace(0, len(steps) - 1, PROGRESS_COLUMNS).round().astype(int)
            steps = [steps[i] for i in sorted(set(picks.tolist()))]
        rows = []
        for image, _ in self.validation:
            with Image.open(image) as source:
                source = source.convert("RGB")
            mask = inpaint_mask(self._panels(), self.trainer.grid, source.height, source.width)  # (1, H, W)
            mask = Image.fromarray((mask[0].numpy() * 255).astype(np.uint8)).convert("RGB")
            outputs = [(_step_label(int(s.name.split("_")[1])), s / f"{Path(image).stem}_0.png") for s in steps]
            rows.append([("input", source), ("mask", mask)] + [(label, _open(p)) for label, p in outputs if p.is_file()])
        sheet = progress_sheet(rows)
        if sheet is not None:
            tmp = root / ".progress.png.tmp"
            sheet.save(tmp, format="PNG")
            os.replace(tmp, root / "progress.png")


def _validation_sources(cfg, records: list) -> list[tuple[Path, str]]:
    """(image, prompt) per --validation_image, its prompt from --validation_prompt or the
    same-stem .txt caption. Without --validation_image: the first training composite."""
    if not cfg.validation_image:
        return [(Path(records[0].image), cfg.validation_prompt or records[0].caption)]
    sources = []
    for name in cfg.validation_image:
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"--validation_image {path}: no such file")
        try:
            with Image.open(path) as image:
                image.verify()
        except (OSError, SyntaxError):
            raise ValueError(f"--validation_image {path}: unreadable image") from None
        caption = path.with_suffix(".txt")
        if cfg.validation_prompt is None and not caption.is_file():
            raise ValueError(f"--validation_image {path}: no same-stem .txt caption; give --validation_prompt")
        if cfg.validation_prompt is not None:
            sources.append((path, cfg.validation_prompt))
            continue
        try:  # read as training reads its captions: UTF-8, a BOM dropped
            sources.append((path, read_caption(caption)))
        except ValueError as error:
            raise ValueError(f"--validation_image {path}: caption {caption.name} is {error}") from None
    return sources


def progress_sheet(tiles_per_row: list[list[tuple[str, Image.Image]]]) -> Image.Image | None:
    """Rows of labelled tiles; small (toy) images are enlarged to about 128 px."""
    if not tiles_per_row:
        return None
    scale = max(1, 128 // max(t[1].height for t in tiles_per_row[0]))  # tiny toy images: enlarge
    width = max(t[1].width for row in tiles_per_row for t in row) * scale
    height = max(t[1].height for row in tiles_per_row for t in row) * scale
    gap, caption = 4, 14
    columns = max(len(row) for row in tiles_per_row)
    sheet = Image.new("RGB", (columns * (width + gap) - gap, len(tiles_per_row) * (height + caption + gap)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, row in enumerate(tiles_per_row):
        top = r * (height + caption + gap)
        for c, (label, tile) in enumerate(row):
            left = c * (width + gap)
            draw.text((left + 2, top + 1), label, fill=(0, 0, 0))
            big = tile.resize((tile.width * scale, tile.height * scale), Image.Resampling.NEAREST)
            sheet.paste(big, (left, top + caption))
            draw.rectangle((left, top + caption, left + big.width - 1, top + caption + big.height - 1), outline=(128, 128, 128))
    return sheet


def plot_loss(steps: list[int], losses: list[float], path: Path, size: tuple[int, int] = (640, 360)) -> None:
    """The loss per step (light) and an exponential moving average (dark), drawn with PIL."""
    if not losses:
        return
    width, height = size
    left, right, top, bottom = 64, 16, 24, 32
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    values = np.asarray(losses, dtype=np.float64)
    finite = values[np.isfinite(values)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if high - low < 1e-12:
        low, high = low - 0.5, high + 0.5
    x0, x1 = steps[0], max(steps[-1], steps[0] + 1)

    def point(step: float, value: float) -> tuple[float, float]:
        x = left + (step - x0) / (x1 - x0) * (width - left - right)
        y = top + (high - value) / (high - low) * (height - top - bottom)
        return x, y

    draw.rectangle((left, top, width - right, height - bottom), outline=(160, 160, 160))
    for value in (low, (low + high) / 2, high):
        y = point(x0, value)[1]
        draw.text((4, y - 6), f"{value:.4g}", fill=(0, 0, 0))
        draw.line((left - 4, y, left, y), fill=(0, 0, 0))
    draw.text((left, height - bottom + 6), f"step {steps[0]}", fill=(0, 0, 0))
    draw.text((width - right - 70, height - bottom + 6), f"step {steps[-1]}", fill=(0, 0, 0))
    draw.text((left, 4), "training loss (light: per step, dark: smoothed)", fill=(0, 0, 0))
    raw = [point(s, v) for s, v in zip(steps, values) if math.isfinite(v)]
    if len(raw) > 1:
        draw.line(raw, fill=(170, 190, 230), width=1)
        draw.line([point(s, v) for s, v in zip(steps, smooth(values))], fill=(20, 60, 170), width=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def smooth(values: np.ndarray, span: float = 0.05) -> list[float]:
    """Bias-corrected exponential moving average over ~span of the run (at least 10 steps)."""
    alpha = 1.0 / max(10.0, span * len(values))
    out, average, weight = [], 0.0, 0.0
    for value in values:
        if math.isfinite(value):
            average = (1 - alpha) * average + alpha * value
            weight = (1 - alpha) * weight + alpha
        out.append(average / weight if weight else float("nan"))
    return out


def _step_label(step: int) -> str:
    return "step 0 (untrained)" if step == 0 else f"step {step}"


def _open(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def _log_sheets(tracker, sheets: list[Image.Image], step: int) -> None:
    if tracker.name == "tensorboard":
        for i, sheet in enumerate(sheets):
            tracker.log_images({f"samples/{i}": np.asarray(sheet)[None]}, step=step, dataformats="NHWC")
    else:
        tracker.log_images({"samples": sheets}, step=step)


def _flat(cfg) -> dict:
    """The run's settings as tracker hyper-parameters (scalars and strings only)."""
    import dataclasses

    flat = {}
    for key, value in dataclasses.asdict(cfg).items():
        flat[key] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def _inference_defaults(backend: str) -> dict:
    from ..backends.registry import backend_spec

    return backend_spec(backend).infer_defaults
