"""--input_dir: a folder of composites completed with one model load.

    python src/inference/sdxl_ic_lora_inference.py --lora_path output/lora/final_model \
        --input_dir tryon_inputs/ --panels_to_inpaint 2 --output_dir tryon_outputs/

Each image NAME.(png|jpg|jpeg|webp) takes its prompt from NAME.txt (UTF-8), else from
--prompt, and a free-form mask from NAME_mask.png when there is one (else
--panels_to_inpaint). Every input is checked before the model loads, and every problem is
reported in one error. Outputs are those of a single-image run, per input, plus
folder_summary.json listing the inputs, their prompts' source, files written and seconds.
Images are batched across inputs: those of inputs with one working size share pipeline
calls of up to --batch_size images, each with its own prompt, input, mask and seed, so each
comes out as a single-image run makes it (up to the float rounding of batched kernels).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from ..backends.lora_files import atomic_write_text
from ..data import IMAGE_SUFFIXES, read_caption
from .config import InferConfig
from .generation import generate_all
from .guards import warn_replacing
from .inpaint import load_pipeline
from .memory_plan import inference_log
from .output_files import resolved_settings, write_outputs
from .planning import Plan, check_inputs

MASK_SUFFIX = "_mask"
SUMMARY_NAME = "folder_summary.json"
SECONDS_NOTE = ("each input's share of the pipeline calls its images were made in (a call's time split evenly "
                "over the call's images), plus writing its files")


def folder_configs(cfg: InferConfig) -> list[InferConfig]:
    """One single-image config per input of --input_dir, in name order."""
    folder = Path(cfg.input_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"--input_dir {folder}: no such folder")
    images = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                    and not p.stem.endswith(MASK_SUFFIX))
    if not images:
        raise ValueError(f"--input_dir {folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    configs, problems = [], []
    for image in images:
        caption = image.with_suffix(".txt")
        if caption.is_file():
            try:
                prompt = read_caption(caption)
            except ValueError as error:
                problems.append(f"{caption.name}: {error}")
                continue
        else:
            prompt = cfg.prompt
        if not prompt or not prompt.strip():
            problems.append(f"{image.name}: no prompt ({caption.name} missing or empty, and no --prompt)")
            continue
        masks = [m for m in folder.glob(f"{image.stem}{MASK_SUFFIX}.*") if m.suffix.lower() in IMAGE_SUFFIXES]
        configs.append(dataclasses.replace(cfg, input_dir=None, input_image=str(image), prompt=prompt,
                                           mask_image=str(masks[0]) if masks else None))
    if problems:
        raise ValueError(f"--input_dir {folder}: {len(problems)} problem(s): {'; '.join(problems)}")
    return configs


def check_folder(cfg: InferConfig) -> list[Plan]:
    """Every input's Plan, checked before any model loads; all problems in one error."""
    plans = []
    problems = []
    for single in folder_configs(cfg):
        try:
            plans.append(check_inputs(single))
        except (ValueError, OSError) as error:
            problems.append(f"{Path(single.input_image).name}: {error}")
    if problems:
        raise ValueError(f"--input_dir {cfg.input_dir}: {len(problems)} problem(s): {'; '.join(problems)}")
    recorded = {(p.base_model, str(p.grid), p.conditioning) for p in plans}
    if len(recorded) > 1:  # every plan resolves these from the same flags and LoRA
        raise ValueError(f"--input_dir {cfg.input_dir}: inputs resolve to different models: {sorted(recorded)}")
    return plans


def run_folder(cfg: InferConfig) -> list[Path]:
    """Check every input, load the model once, then complete the inputs in batches and write
    each as soon as its images are made."""
    plans = check_folder(cfg)
    warn_replacing(Path(cfg.output_dir), [p.stem for p in plans])
    start = time.monotonic()
    memory = inference_log(cfg.memory_log)
    backend, pipe = load_pipeline(plans[0])
    if memory is not None:
        memory.record("load", backend, 0)
    load_seconds = time.monotonic() - start
    written, entries = {}, {}
    for i, outputs, seeds, seconds in generate_all(plans, backend, pipe, memory):  # each input as soon as it is made
        plan, start = plans[i], time.monotonic()
        written[i] = write_outputs(plan, outputs, seeds, resolved_settings(plan, backend))
        entries[i] = {
            "input": plan.cfg.input_image, "mask": plan.cfg.mask_image, "panels": plan.panels,
            "prompt_from": "txt" if Path(plan.cfg.input_image).with_suffix(".txt").is_file() else "--prompt",
            "seeds": seeds, "files": [f.name for f in written[i]],
            "seconds": round(seconds + time.monotonic() - start, 2),
        }
    summary = Path(cfg.output_dir) / SUMMARY_NAME
    atomic_write_text(json.dumps({
        "input_dir": cfg.input_dir, "model_load_seconds": round(load_seconds, 2), "batch_size": cfg.batch_size,
        "seconds_per_input": SECONDS_NOTE, "images": [entries[i] for i in sorted(entries)],
    }, indent=2), summary)
    return [*(f for i in sorted(written) for f in written[i]), summary]
