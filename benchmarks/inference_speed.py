"""Seconds per image of our inference against the stock diffusers pipeline, same model and LoRA.

    python benchmarks/inference_speed.py                         # CUDA: full-size SDXL and FLUX.1, 1024²
    python benchmarks/inference_speed.py --models sdxl --sizes 1024,1024x1536 --batch_size 4
    python benchmarks/inference_speed.py --tiny                  # CPU smoke run (the default without CUDA)

Per model and size it
  1. saves a base pipeline folder and a rank-R LoRA made by our backend (inference_models.py:
     the tiny in-code models, or every component at its public size with random weights made
     on the device), so both sides load from disk the way a user does;
  2. ours: the inference entry point's `load_pipeline` (our backend from the folder, the LoRA,
     eval, dtype, device), then `generate` for --images images at batch 1 and at --batch_size;
  3. stock: StableDiffusionXLInpaintPipeline / FluxInpaintPipeline `from_pretrained` +
     `load_lora_weights`, called with `num_images_per_prompt` and a generator list;
  4. folder: `--input_dir` over --folder_images composites, one image each, timed whole, its one
     model load included;
and prints a markdown table: seconds per image, the median of --repeats timed runs after a short
warm-up call. Both sides run `blend` conditioning (whose LoRA the stock inpaint pipeline runs as
ours does), the entry points' default steps and guidance (SDXL 50 steps at 7.5, with
classifier-free guidance; FLUX 20 at 3.5), on the device and dtype inference picks (CUDA: fp16
SDXL, bf16 FLUX; else the CPU in float32, one thread with --tiny).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything loads from the folders this script writes
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")  # from_pretrained's notes on a folder it wrote itself
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np
import torch
from PIL import Image

if __package__ in (None, ""):  # run by path from a plain checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from _bootstrap import ensure_package

    sys.path.pop(0)
    ensure_package()

from iclora.logs import setup_logging  # noqa: E402

setup_logging()  # the stack's known noise filtered as in the CLIs, before the imports that print it

# benchmarks/ is no package: its modules import each other by name from this folder.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from inference_models import CONDITIONING, pipeline_components, save_base, save_lora, stock_pipeline  # noqa: E402
from memory_measure import WEIGHT_DTYPES, _free, _sync  # noqa: E402
from memory_models import FAMILIES  # noqa: E402
from train_memory import _list, parse_size  # noqa: E402

sys.path.pop(0)

from iclora.inference import flux_ic_lora_inference, sdxl_ic_lora_inference  # noqa: E402
from iclora.inference.config import InferConfig  # noqa: E402
from iclora.inference.folder import run_folder  # noqa: E402
from iclora.inference.inpaint import batches, check_inputs, generate, load_pipeline  # noqa: E402
from iclora.panels import Grid, inpaint_mask  # noqa: E402

ENTRY_DEFAULTS = {"sdxl": sdxl_ic_lora_inference.DEFAULTS, "flux": flux_ic_lora_inference.DEFAULTS}
PANELS = [2, 3]  # the bottom row of a 2x2 composite is generated
PROMPT = "four views of a red chair: front, side, top and back"  # under 75 tokens for every tokenizer
WARMUP_STEPS = 2  # a short call per batch size first: kernels and allocator warmed, not timed
COLUMNS = ["model", "mode", "W×H", "steps", "bs", "images", "ours s/img", "stock s/img", "×stock", "ours load s",
           "stock load s"]


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _median_per_image(fn: Callable[[], object], images: int, repeats: int, device: torch.device) -> float:
    return statistics.median(_timed(fn, device) for _ in range(repeats)) / images


# ---- the three ways to make images ---------------------------------------------------------------


def time_ours(cfg: InferConfig, batch_sizes: list[int], repeats: int, device) -> tuple[float, dict[int, float]]:
    """load_pipeline once, then generate() --images images at each batch size: (load s, {bs: s/image})."""
    start = time.perf_counter()
    plan = check_inputs(cfg)
    backend, pipe = load_pipeline(plan)
    load = time.perf_counter() - start
    pipe.set_progress_bar_config(disable=True)
    per_image = {}
    for b in batch_sizes:
        warm = check_inputs(dataclasses.replace(cfg, num_images=b, batch_size=b, num_inference_steps=WARMUP_STEPS))
        generate(warm, backend, pipe)
        timed = check_inputs(dataclasses.replace(cfg, batch_size=b))
        per_image[b] = _median_per_image(lambda: generate(timed, backend, pipe), cfg.num_images, repeats, device)
    backend = pipe = None  # free them before the next model loads
    _free(device)
    return load, per_image


def time_stock(model: str, folder: Path, lora: Path, cfg: InferConfig, batch_sizes: list[int], repeats: int,
               device, dtype) -> tuple[float, dict[int, float]]:
    """The stock pipeline, loaded the stock way, making the same images: (load s, {bs: s/image})."""
    start = time.perf_counter()
    pipe = stock_pipeline(model, folder, lora, device, dtype)
    load = time.perf_counter() - start
    with Image.open(cfg.input_image) as source:
        image = source.convert("RGB")
    mask = inpaint_mask(PANELS, Grid(2, 2), image.height, image.width)  # (1, H, W), 1 = regenerate
    mask = Image.fromarray((mask[0].numpy() * 255).astype(np.uint8))

    def make(images: int, batch: int, steps: int) -> None:
        for seeds in batches(list(range(images)), batch):
            pipe(prompt=PROMPT, image=image, mask_image=mask, height=image.height, width=image.width, strength=1.0,
                 num_inference_steps=steps, guidance_scale=cfg.guidance_scale, num_images_per_prompt=len(seeds),
                 generator=[torch.Generator("cpu").manual_seed(s) for s in seeds])

    per_image = {}
    for b in batch_sizes:
        make(b, b, WARMUP_STEPS)
        steps = cfg.num_inference_steps
        per_image[b] = _median_per_image(lambda: make(cfg.num_images, b, steps), cfg.num_images, repeats, device)
    pipe = None  # freed before the next model loads
    _free(device)
    return load, per_image


def time_folder(cfg: InferConfig, inputs: Path, out: Path, device) -> tuple[float, float]:
    """--input_dir over every composite in `inputs`, one image each, timed whole:
    (s/image with the one model load included, the load's own seconds)."""
    folder_cfg = dataclasses.replace(cfg, input_dir=str(inputs), input_image=None, num_images=1, batch_size=1,
                                     output_dir=str(out))
    count = len(list(inputs.glob("*.png")))
    seconds = _timed(lambda: run_folder(folder_cfg), device)
    summary = json.loads((out / "folder_summary.json").read_text())
    _free(device)
    return seconds / count, summary["model_load_seconds"]


# ---- one model and size ---------------------------------------------------------------------------


def write_inputs(folder: Path, count: int, size: tuple[int, int]) -> Path:
    """`count` random composites NAME.png, each with its prompt in NAME.txt."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"{i:05d}.png")
        (folder / f"{i:05d}.txt").write_text(PROMPT)
    return folder


def bench_model(model: str, size: tuple[int, int], args, work: Path) -> list[dict]:
    """The rows of one model at one size: pipeline at batch 1 and --batch_size, then the folder."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # where load_pipeline puts ours
    native = WEIGHT_DTYPES[FAMILIES[model].backend_cls().preferred_mixed_precision]  # as load_pipeline's default
    dtype = native if device.type == "cuda" else torch.float32
    base, lora = work / f"{model}_base", work / f"{model}_lora"
    if not base.is_dir():  # one base and LoRA per model, whatever the size
        components = pipeline_components(model, args.tiny, device, dtype)
        save_base(model, components, base)
        save_lora(model, components, lora, args.rank)
        del components
        _free(device)
    inputs = write_inputs(work / f"inputs_{model}_{size[0]}x{size[1]}", args.folder_images, size)
    defaults = ENTRY_DEFAULTS[model]
    cfg = InferConfig(
        lora_path=str(lora), prompt=PROMPT, input_image=str(inputs / "00000.png"), panels_to_inpaint=PANELS,
        output_dir=str(work / "ours"), num_inference_steps=args.steps or defaults["num_inference_steps"],
        guidance_scale=defaults["guidance_scale"], num_images=args.images, seed=0, backend=model,
        base_model=str(base), conditioning=CONDITIONING, native_size=True,  # timed at the size given
    )
    batch_sizes = sorted({1, args.batch_size})
    ours_load, ours = time_ours(cfg, batch_sizes, args.repeats, device)
    folder, folder_load = time_folder(cfg, inputs, work / "folder", device)
    stock_load, stock = time_stock(model, base, lora, cfg, batch_sizes, args.repeats, device, dtype)
    common = {"model": model, "size": list(size), "steps": cfg.num_inference_steps}
    rows = [{**common, "mode": "pipeline", "batch_size": b, "images": args.images, "ours": ours[b], "stock": stock[b],
             "ours_load": ours_load, "stock_load": stock_load} for b in batch_sizes]
    inputs_word = "input" if args.folder_images == 1 else "inputs"
    rows.append({**common, "mode": f"folder ({args.folder_images} {inputs_word}, 1 load)", "batch_size": 1,
                 "images": args.folder_images, "ours": folder, "stock": None, "ours_load": folder_load,
                 "stock_load": None})
    return rows


# ---- the report ----------------------------------------------------------------------------------


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def table_row(row: dict) -> list[str]:
    ratio = "-" if row["stock"] is None else f"{row['ours'] / row['stock']:.3f}"
    return [row["model"], row["mode"], f"{row['size'][0]}×{row['size'][1]}", str(row["steps"]), str(row["batch_size"]),
            str(row["images"]), _seconds(row["ours"]), _seconds(row["stock"]), ratio, _seconds(row["ours_load"]),
            _seconds(row["stock_load"])]


def device_line() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    threads = torch.get_num_threads()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    cpu = platform.processor() or platform.machine()
    return f"CPU {cpu}, {threads} thread(s), {os.cpu_count()} cores, load average {load}"


def render(rows: list[dict], command: str, args, device: str) -> str:
    import diffusers
    import peft

    lines = [
        "# iclora inference benchmark",
        "",
        f"- device: {device}",
        f"- date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- torch {torch.__version__}, diffusers {diffusers.__version__}, peft {peft.__version__}, "
        f"python {platform.python_version()}",
        f"- command: `{command}`",
        f"- {'tiny in-code models' if args.tiny else 'full-size public configs, random weights'}; `{CONDITIONING}` "
        f"conditioning, LoRA rank {args.rank}; median of {args.repeats} timed run(s) after a {WARMUP_STEPS}-step warm-up",
        "- ours: the entry point's load_pipeline + generate (composites written in memory, not to disk); stock: "
        "diffusers' inpaint pipeline, from_pretrained + load_lora_weights; ×stock = ours / stock",
        "- folder: --input_dir, one image per input, timed whole (s/img includes the one model load, cold)",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
    ]
    lines += ["| " + " | ".join(table_row(r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="the tiny in-code models (the default without CUDA)")
    p.add_argument("--models", type=_list(str), default=["sdxl", "flux"], help="comma list: sdxl,flux")
    p.add_argument("--sizes", type=_list(parse_size), help="comma list of WIDTHxHEIGHT or one side (default 1024, tiny 64)")
    p.add_argument("--steps", type=int, help="denoising steps (default: the entry point's, 50 SDXL / 20 FLUX; tiny 2)")
    p.add_argument("--batch_size", type=int, help="the batched rows' --batch_size (default 4, tiny 2)")
    p.add_argument("--images", type=int, help="images per timed run (default: --batch_size)")
    p.add_argument("--folder_images", type=int, help="composites in the folder run (default 4, tiny 3)")
    p.add_argument("--rank", type=int, help="LoRA rank, alpha = rank (default 16, tiny 4)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per row, their median reported (default 1)")
    p.add_argument("--workdir", type=Path, help="where the models and outputs are written (default: a temporary folder)")
    p.add_argument("--out", type=Path, help="also write the markdown report here (atomically)")
    return p


def resolve(args) -> None:
    """Fill the defaults that depend on --tiny; refuse what cannot run."""
    args.tiny = tiny = args.tiny or not torch.cuda.is_available()
    defaults = {"sizes": [(64, 64) if tiny else (1024, 1024)], "batch_size": 2 if tiny else 4,
                "folder_images": 3 if tiny else 4, "rank": 4 if tiny else 16, "steps": 2 if tiny else None}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.images is None:
        args.images = args.batch_size
    unknown = [m for m in args.models if m not in FAMILIES]
    if unknown:
        raise SystemExit(f"--models: unknown {', '.join(unknown)} (choose from sdxl, flux)")
    for name in ("steps", "batch_size", "images", "folder_images", "rank", "repeats"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise SystemExit(f"--{name} must be at least 1, got {getattr(args, name)}")


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the benchmark; returns one dict per table row (the smoke test reads them)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    resolve(args)
    threads = torch.get_num_threads()
    if not torch.cuda.is_available():
        torch.set_num_threads(1)  # tiny ops gain nothing from threads; OpenMP spin-waits on a shared CPU cost 10x
    device = device_line()
    command = ("python benchmarks/inference_speed.py " + shlex.join(argv)).strip()
    rows: list[dict] = []
    try:
        with tempfile.TemporaryDirectory() as scratch:
            work = args.workdir or Path(scratch)
            for model in args.models:
                for size in args.sizes:
                    print(f"[{model} {size[0]}x{size[1]}]", file=sys.stderr, flush=True)
                    measured = bench_model(model, size, args, work)
                    for row in measured:  # each as soon as it is measured: a run cut short keeps them
                        print("| " + " | ".join(table_row(row)) + " |", file=sys.stderr, flush=True)
                    rows += measured
    finally:
        torch.set_num_threads(threads)
    report = render(rows, command, args, device)
    print(report)
    if args.out:
        from iclora.backends.lora_files import atomic_write_text

        atomic_write_text(report, args.out)
    return rows


if __name__ == "__main__":
    main()
