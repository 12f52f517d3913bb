"""Known-answer benchmark: does masked-panel training learn in-context completion?

    python benchmarks/known_answer.py                        # SDXL, concat: ~7 min on 2 CPU cores
    python benchmarks/known_answer.py --picture docs/known_answer.png   # + the README picture
    python benchmarks/known_answer.py --conditioning blend   # the latent-blending path instead
    python benchmarks/known_answer.py --backend flux         # FLUX.1-Fill layout (concat), ~10 min
    python benchmarks/known_answer.py --backend flux --conditioning blend   # FLUX.1-dev layout
    python -m pytest -m slow tests/test_known_answer.py      # the concat run, with its assertions

The toy task (iclora.toy) draws one object (8 colours x 4 shapes) into every panel of a 2x2
composite at that panel's own position and size; captions never name colour or shape. So
the hidden panels 2 and 3 are fixed by the visible panels 0 and 1 and by nothing else: a
model that fills them correctly has read the visible panels.

There are only 32 distinct composites at one panel size, so a new seed of make_dataset
would mostly redraw training images. Held out instead are 8 (colour, shape) *pairs*, one
per colour and two per shape (every colour and every shape is still seen in training, but
never in these combinations); training sees the other 24 composites.

1. Base model (fit_toy_base.make_base_model): the tiny SDXL of iclora.backends.tiny saved
   as a diffusers folder, with the toy VAE (benchmarks/assets/toy_vae, fit_toy_vae.py) so
   errors are in pixels, and the toy base UNet (benchmarks/assets/toy_sdxl_unet,
   fit_toy_base.py): pretrained to draw any object in any panel, independently, never a
   composite. Training and inference load it with --model_id / --base_model FOLDER.
   With --backend flux: fit_toy_flux.make_flux_base_model, the tiny FLUX text encoders, the
   same toy VAE (FLUX shift/scale) and a toy transformer pretrained the same way
   (benchmarks/assets/toy_flux_transformer for blend, toy_flux_fill_transformer for concat).
2. Train with the real CLI entry point (train_<backend>_ic_lora.main): (b) the IC-LoRA with the
   default --mask_probability 0.7, (c) the same run with --mask_probability 0 (every sample
   trained as text -> whole composite).
3. Complete panels 2 3 of each evaluation composite with the real inference code
   (inpaint.check_inputs / load_pipeline / generate), fixed seed, for (a) the untrained
   model, (b) and (c); plus baselines that need no model: (d) copy visible panel 0 -> 2 and
   1 -> 3 (right colour and shape, wrong place and size), (e) flat background (a blank
   guess), and the VAE round trip of the true composite (the floor for any model that
   decodes through this VAE).
4. Print the table: mean absolute error (0-255) over the hidden panels, on unseen pairs and
   on the training composites; the share of hidden panels whose object came out in the
   right palette colour; and the visible panels' error (0: inference pastes them back).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from dataclasses import asdict, is_dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from iclora.logs import setup_logging  # noqa: E402

setup_logging()  # the stack's known noise filtered as in the CLIs, before the imports that print it

from fit_toy_base import TOY_UNET, TOY_VAE, make_base_model  # noqa: E402
from fit_toy_flux import TOY_FLUX, make_flux_base_model  # noqa: E402

from iclora.panels import Grid, panel_box  # noqa: E402
from iclora.toy import BACKGROUND, PALETTE, SHAPES, make_caption, make_sample  # noqa: E402

PANEL_SIZE = 64  # 2x2 panels of 64 px: 128 x 128 composites, trained at --image_size 128
GRID = Grid(2, 2)
HIDDEN, VISIBLE = [2, 3], [0, 1]
COLOURS = list(PALETTE)
# One held-out shape per colour, each shape twice: pair i = (colour i, shape i mod 4).
HELD_OUT = [(colour, SHAPES[i % len(SHAPES)]) for i, colour in enumerate(COLOURS)]
# Per backend, each sized to train (b) and (c) inside 10 minutes on 2 CPU cores. A FLUX step
# costs more (512 T5 tokens attend with the 64 image tokens); at equal compute, more steps
# of batch 4 beat fewer of batch 8 (benchmarks/RESULTS.md).
DEFAULT_STEPS = {"sdxl": 1500, "flux": 1650}
DEFAULT_BATCH_SIZE = {"sdxl": 8, "flux": 4}
DEFAULT_LR = {"sdxl": 3e-3, "flux": 3e-3}


# ---- data -----------------------------------------------------------------------------------


def composites(seed: int = 0) -> dict[tuple[str, str], Image.Image]:
    """The 32 distinct toy composites, keyed by (colour, shape), drawn by iclora.toy."""
    found: dict[tuple[str, str], Image.Image] = {}
    rng = np.random.default_rng(seed)
    while len(found) < len(COLOURS) * len(SHAPES):
        sample = make_sample(rng, panel_size=PANEL_SIZE, grid=(GRID.rows, GRID.cols))
        found.setdefault((sample.colour, sample.shape), sample.image)
    return found


def write_folder(folder: Path, images: dict[tuple[str, str], Image.Image]) -> list[Path]:
    """name.png + name.txt (the toy caption) per composite, the trainer's data layout."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for (colour, shape), image in sorted(images.items()):
        path = folder / f"{colour}_{shape}.png"
        image.save(path)
        path.with_suffix(".txt").write_text(make_caption((GRID.rows, GRID.cols)))
        paths.append(path)
    return paths


# ---- the product: training and inference ------------------------------------------------------


def train(model_dir: Path, data_dir: Path, out_dir: Path, mask_probability: float, args, grid: Grid = GRID,
          image_size: int = 2 * PANEL_SIZE) -> tuple[Path, float]:
    """One run of the training CLI, in-process. Returns (final_model dir, seconds)."""
    import importlib

    from iclora.backends.registry import backend_spec

    train_main = importlib.import_module(backend_spec(args.backend).train_script).main  # the backend's own script

    argv = [
        "--backend", args.backend, "--model_id", str(model_dir), "--data_dir", str(data_dir),
        "--output_dir", str(out_dir), "--image_size", str(image_size), "--grid", str(grid),
        "--conditioning", args.conditioning, "--mask_probability", str(mask_probability),
        *(["--context_timestep", args.context_timestep] if args.context_timestep else []),
        "--max_masked_panels", str(getattr(args, "max_masked_panels", 2)),
        "--max_train_steps", str(args.steps), "--batch_size", str(args.batch_size),
        "--learning_rate", str(args.lr), "--lr_scheduler", args.lr_scheduler,
        "--lr_warmup_steps", str(args.warmup),
        "--lora_rank", str(args.rank), "--lora_alpha", str(args.rank), "--lora_dropout", "0",
        "--cache_text_embeddings", "--save_every", str(10 * args.steps), "--seed", str(args.seed),
        *shlex.split(getattr(args, "train_args", None) or ""),
    ]
    start = time.monotonic()
    result = train_main(argv)
    return result.final_dir, time.monotonic() - start


def complete(model_dir: Path, lora: str, images: list[Path], args, conditioning: str | None = None,
             prompt: str | None = None, hidden: list[int] = HIDDEN, grid: Grid = GRID,
             blend_visible: bool = True) -> list[np.ndarray]:
    """The `hidden` panels of every image completed by the real inference code, one fixed
    seed (with `conditioning`, that inference mode instead of the trained one)."""
    conditioning = conditioning or args.conditioning
    context_timestep = args.context_timestep if conditioning == "context" else None
    from iclora.inference.config import InferConfig
    from iclora.inference.inpaint import check_inputs, generate, load_pipeline

    plans = [
        check_inputs(InferConfig(
            lora_path=lora, prompt=prompt or make_caption((GRID.rows, GRID.cols)), input_image=str(path),
            panels_to_inpaint=hidden, grid=str(grid), backend=args.backend, base_model=str(model_dir),
            conditioning=conditioning, context_timestep=context_timestep, num_inference_steps=args.inference_steps,
            guidance_scale=args.guidance_scale, seed=args.seed, blend_visible=blend_visible,
            native_size=True,  # at the training size, the untrained base ("none", no record) too
        ))
        for path in images
    ]
    backend, pipe = load_pipeline(plans[0])
    return [np.asarray(generate(plan, backend, pipe)[0][0]) for plan in plans]


# ---- scoring ----------------------------------------------------------------------------------


def panel_pixels(image: np.ndarray, indices: list[int]) -> np.ndarray:
    """The listed panels' pixels, stacked: (len(indices), h, w, 3) float."""
    height, width = image.shape[:2]
    crops = []
    for k in indices:
        left, top, right, bottom = panel_box(k, GRID, width, height)
        crops.append(image[top:bottom, left:right].astype(np.float64))
    return np.stack(crops)


def nearest_colour(rgb: np.ndarray) -> str:
    names = ["background", *COLOURS]
    table = np.array([BACKGROUND, *PALETTE.values()], dtype=np.float64)
    return names[int(np.argmin(((table - rgb) ** 2).sum(1)))]


def score(pred: np.ndarray, truth: np.ndarray, colour: str) -> dict[str, float]:
    """MAE (0-255) of hidden and visible panels, and the share of hidden panels whose object
    pixels (where the true object is) have the true palette colour as their median."""
    hidden_pred, hidden_true = panel_pixels(pred, HIDDEN), panel_pixels(truth, HIDDEN)
    background = np.array(BACKGROUND, dtype=np.float64)
    matches = []
    for p, t in zip(hidden_pred, hidden_true):
        on_object = np.abs(t - background).max(-1) > 0  # (h, w)
        matches.append(nearest_colour(np.median(p[on_object], axis=0)) == colour)
    return {
        "hidden": float(np.abs(hidden_pred - hidden_true).mean()),
        "visible": float(np.abs(panel_pixels(pred, VISIBLE) - panel_pixels(truth, VISIBLE)).mean()),
        "colour": float(np.mean(matches)),
    }


def copy_baseline(truth: np.ndarray) -> np.ndarray:
    """Hidden panel 2 <- visible panel 0, 3 <- 1: the visible object, unmoved and unscaled."""
    out = truth.copy()
    height, width = truth.shape[:2]
    for src, dst in zip(VISIBLE, HIDDEN):
        sl, st, sr, sb = panel_box(src, GRID, width, height)
        dl, dt, dr, db = panel_box(dst, GRID, width, height)
        out[dt:db, dl:dr] = truth[st:sb, sl:sr]
    return out


def background_baseline(truth: np.ndarray) -> np.ndarray:
    out = truth.copy()
    height, width = truth.shape[:2]
    for k in HIDDEN:
        left, top, right, bottom = panel_box(k, GRID, width, height)
        out[top:bottom, left:right] = BACKGROUND
    return out


@torch.no_grad()
def vae_round_trip(vae, truth: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(truth.astype(np.float32) / 127.5 - 1).permute(2, 0, 1)[None]  # (1, 3, H, W)
    y = vae.decode(vae.encode(x).latent_dist.mode()).sample[0].permute(1, 2, 0)  # (H, W, 3)
    return ((y.clamp(-1, 1) + 1) * 127.5).round().numpy().astype(np.uint8)


def summarise(rows: dict[str, list[np.ndarray]], truths, colours, unseen: list[bool]) -> dict[str, dict]:
    table = {}
    for name, preds in rows.items():
        scores = [score(p, t, c) for p, t, c in zip(preds, truths, colours)]

        def pick(key: str, held: bool) -> float:
            return float(np.mean([s[key] for s, u in zip(scores, unseen) if u == held]))

        table[name] = {
            "hidden_unseen": pick("hidden", True), "hidden_seen": pick("hidden", False),
            "colour_unseen": pick("colour", True), "colour_seen": pick("colour", False),
            "visible": float(np.mean([s["visible"] for s in scores])),
        }
    return table


def format_table(table: dict[str, dict]) -> str:
    lines = [
        "| | hidden MAE, unseen pairs | hidden MAE, training composites | right colour, unseen | "
        "right colour, training | visible MAE |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in table.items():
        lines.append(
            f"| {name} | {r['hidden_unseen']:.1f} | {r['hidden_seen']:.1f} | {r['colour_unseen']:.0%} | "
            f"{r['colour_seen']:.0%} | {r['visible']:.1f} |"
        )
    return "\n".join(lines)


# ---- the picture -------------------------------------------------------------------------------


def picture(path: Path, rows: list[tuple[np.ndarray, ...]], labels: list[str], scale: int = 2) -> None:
    """One row per composite: truth | mask | completions, each tile enlarged `scale` times."""
    gap, caption_h = 4, 14
    tile_h, tile_w = rows[0][0].shape[0] * scale, rows[0][0].shape[1] * scale
    sheet = Image.new("RGB", (len(labels) * (tile_w + gap) - gap, caption_h + len(rows) * (tile_h + gap)), "white")
    draw = ImageDraw.Draw(sheet)
    for col, label in enumerate(labels):
        draw.text((col * (tile_w + gap) + 2, 1), label, fill=(0, 0, 0))
    for r, row in enumerate(rows):
        for col, array in enumerate(row):
            image = Image.fromarray(array).resize((tile_w, tile_h), Image.Resampling.NEAREST)
            sheet.paste(image, (col * (tile_w + gap), caption_h + r * (tile_h + gap)))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def mask_tile(size: int) -> np.ndarray:
    mask = np.zeros((size, size, 3), dtype=np.uint8)
    for k in HIDDEN:
        left, top, right, bottom = panel_box(k, GRID, size, size)
        mask[top:bottom, left:right] = 255
    return mask


# ---- main ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=["sdxl", "flux"], default="sdxl")
    parser.add_argument("--conditioning", choices=["concat", "blend", "context"], default="concat",
                        help="concat: SDXL inpainting UNet / FLUX.1-Fill layout; blend: latent blending; "
                             "context: visible panels clean in the denoiser input")
    parser.add_argument("--context_timestep", choices=["zero", "shared"], default=None,
                        help="with context: clean tokens at timestep 0 (FLUX default) or the shared t")
    parser.add_argument("--mask_probability", type=float, default=0.7, help="for (b) (default: the trainer's)")
    parser.add_argument("--max_masked_panels", type=int, default=2,
                        help="for (b) (default 2, the SDXL script's; the FLUX script's own default is 3)")
    parser.add_argument("--train_args", default="", help="more training flags for (b) and (c), e.g. "
                        "'--timestep_sampling logit_normal --logit_mean 1'")
    parser.add_argument("--skip_c", action="store_true",
                        help="do not train (c): its training does not depend on --context_timestep")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"optimizer steps per training run (default: {DEFAULT_STEPS})")
    parser.add_argument("--batch_size", type=int, default=None, help=f"default: {DEFAULT_BATCH_SIZE}")
    parser.add_argument("--lr", type=float, default=None, help=f"learning rate (default: {DEFAULT_LR})")
    parser.add_argument("--lr_scheduler", default="cosine")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--inference_steps", type=int, default=20)
    parser.add_argument("--guidance_scale", type=float, default=1.0,
                        help="1: no CFG (captions are constant and never dropped in training)")
    parser.add_argument("--n_seen", type=int, default=8, help="training composites also scored")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: all cores; 1 on a machine shared with other jobs)")
    parser.add_argument("--vae", default=str(TOY_VAE), help="fitted toy VAE folder")
    parser.add_argument("--unet", default=None,
                        help="pretrained toy base denoiser folder (SDXL UNet / FLUX transformer), or 'random' "
                             "for an untrained one (default: the fitted one in benchmarks/assets)")
    parser.add_argument("--work_dir", default=None, help="keep models and LoRAs here (default: a temp dir)")
    parser.add_argument("--picture", default=None,
                        help="write the comparison picture here (e.g. docs/known_answer.png)")
    parser.add_argument("--json", default=None, help="write the table and settings here")
    args = parser.parse_args(argv)
    args.steps = args.steps or DEFAULT_STEPS[args.backend]
    args.batch_size = args.batch_size or DEFAULT_BATCH_SIZE[args.backend]
    args.lr = args.lr or DEFAULT_LR[args.backend]
    if args.unet is None:
        args.unet = str(TOY_FLUX[args.conditioning] if args.backend == "flux" else TOY_UNET)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    # The toy caption is longer than CLIP's 77 byte-tokens: one truncation warning per call.
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    torch.set_num_threads(args.threads or max(1, os.cpu_count() or 1))
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="known_answer_") as tmp:
        work = Path(args.work_dir or tmp)
        all_images = composites(args.seed)
        train_set = {k: v for k, v in all_images.items() if k not in HELD_OUT}
        seen = sorted(train_set)[:: max(1, len(train_set) // args.n_seen)][: args.n_seen]
        eval_set = {**{k: all_images[k] for k in HELD_OUT}, **{k: all_images[k] for k in seen}}
        unet = Path(args.unet) if args.unet != "random" else None
        if args.backend == "flux":
            model_dir = make_flux_base_model(work / "base", args.conditioning, Path(args.vae), unet)
        else:
            model_dir = make_base_model(work / "base", Path(args.vae), unet)
        write_folder(work / "train", train_set)
        eval_paths = write_folder(work / "eval", eval_set)
        keys = sorted(eval_set)  # write_folder's order
        truths = [np.asarray(eval_set[k]) for k in keys]
        colours = [k[0] for k in keys]
        unseen = [k in HELD_OUT for k in keys]

        timings = {}
        lora_b, timings["train (b)"] = train(model_dir, work / "train", work / "lora_b", args.mask_probability, args)
        if not args.skip_c:
            lora_c, timings["train (c)"] = train(model_dir, work / "train", work / "lora_c", 0.0, args)
        t = time.monotonic()
        b_name = f"(b) IC-LoRA, --mask_probability {args.mask_probability:g}"
        if args.max_masked_panels != 2:
            b_name += f" --max_masked_panels {args.max_masked_panels}"
        if args.train_args:
            b_name += f" {args.train_args}"
        rows = {
            "(a) untrained model": complete(model_dir, "none", eval_paths, args),
            b_name: complete(model_dir, str(lora_b), eval_paths, args),
        }
        if not args.skip_c:
            rows["(c) LoRA, --mask_probability 0"] = complete(model_dir, str(lora_c), eval_paths, args)
        if args.conditioning == "context":  # what stock latent-blend inference makes of the same LoRA
            rows["(b) through blend inference"] = complete(model_dir, str(lora_b), eval_paths, args, "blend")
        timings["inference"] = time.monotonic() - t
        rows["(d) copy panel 0->2, 1->3"] = [copy_baseline(x) for x in truths]
        rows["(e) flat background"] = [background_baseline(x) for x in truths]
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(args.vae).eval()
        rows["VAE round trip of the truth (floor)"] = [vae_round_trip(vae, x) for x in truths]
        table = summarise(rows, truths, colours, unseen)

        if args.picture and not args.skip_c:
            shown = [i for i, u in enumerate(unseen) if u][:4]
            b, c = list(rows.values())[1:3]
            tiles = [(truths[i], mask_tile(truths[i].shape[0]), b[i], c[i]) for i in shown]
            picture(Path(args.picture), tiles,
                    ["held-out composite", "mask (white=hidden)", "(b) IC-LoRA", "(c) mask_prob 0"])
    timings["total"] = time.monotonic() - start
    return publish(table, format_table(table), args, timings,
                   eval={"unseen_pairs": HELD_OUT, "training_pairs_scored": seen})


def publish(table: dict, text: str, args, timings: dict, **extra) -> dict:
    """Print the table and the timings; write the whole report to --json when given."""
    report = {
        "table": table,
        # Dataclass settings (the harder toy's Toy) as their fields: the report is JSON.
        "settings": {k: asdict(v) if is_dataclass(v) else v for k, v in vars(args).items()
                     if k not in ("work_dir", "picture", "json")},
        "seconds": {k: round(v, 1) for k, v in timings.items()},
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}",
        **extra,
    }
    print(text)
    print(json.dumps({"seconds": report["seconds"], "machine": report["machine"]}))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
