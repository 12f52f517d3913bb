"""Known-answer benchmark on the harder toy: does the LoRA read a continuous colour from
the visible panels when the object's place and size change from panel to panel?

    python benchmarks/known_answer_hard.py --backend sdxl --conditioning concat
    python benchmarks/known_answer_hard.py --backend flux --conditioning context --grid 1x3
    python benchmarks/known_answer_hard.py --backend flux2 --conditioning context --mask_probability 1 \
        --max_masked_panels 3 --guidance_scale 1
    python benchmarks/known_answer_hard.py --backend flux2 --conditioning reference --mask_probability 1 \
        --max_masked_panels 3 --guidance_scale 1
    python benchmarks/known_answer_hard.py --help

The toy (hard_toy.py): one object of any RGB colour and one of four shapes in every panel,
at a random size and place per panel; captions name none of them. Training composites
and evaluation composites are drawn from different seeds, so every evaluated colour is new.
The bases (fit_hard_toy.py) draw any object anywhere but were never shown related panels.

Trained with the real training CLI: (b) the IC-LoRA (--mask_probability 0.7), (c) the same
with --mask_probability 0 (whole composites, text -> set). Completed with the real
inference code, the last panel(s) hidden (2x2: panels 2 3; 1x3: panel 2), and scored by
the *colour* of the object drawn in each hidden panel (hard_toy.object_colour: the median
of the pixels far from the background), as mean absolute RGB error 0-255, and
the share of hidden panels within 25 of the true colour. Baselines: (a) the untrained
base, the blind guess (the mean colour of the toy's range), and the VAE round trip of the
truth (the floor). With context conditioning also the (b) LoRA through plain latent-blend
inference: what a stock inpainting pipeline would make of it.

Text -> set (`--panels_to_inpaint all`, no input image), what the masking settings trade
away: --n_sets sets from the caption alone per model, scored by how far each panel's object
colour lies from the set's median colour (0: one object throughout) and the share of
panels that show an object at all.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from iclora.logs import setup_logging  # noqa: E402

setup_logging()  # the stack's known noise filtered as in the CLIs, before the imports that print it

from fit_hard_toy import HARD_BASES  # noqa: E402
from fit_toy_base import TOY_VAE, make_base_model  # noqa: E402
from fit_toy_flux import make_flux_base_model  # noqa: E402
from fit_toy_flux2 import make_flux2_base_model  # noqa: E402
from hard_toy import BACKGROUND, Toy, caption, colour_error, composite, set_spread, toy_arguments, toy_from_args  # noqa: E402
from known_answer import complete, picture, publish, train, vae_round_trip  # noqa: E402

from iclora.panels import Grid, panel_box  # noqa: E402

CLOSE = 25.0  # a hidden panel "has the colour" within this mean absolute RGB error


def write_set(folder: Path, n: int, grid: Grid, seed: int, toy: Toy = Toy()):
    """n composites + captions in the trainer's layout. Returns (paths, (object colour,
    background colour) per composite)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths, colours = [], []
    for i in range(n):
        image, rgb, _ = composite(rng, grid, toy)
        path = folder / f"{i:05d}.png"
        image.save(path)
        path.with_suffix(".txt").write_text(caption(grid))
        paths.append(path)
        pixels = np.asarray(image).reshape(-1, 3)  # two colours exactly: the object's and the background
        colours.append((rgb, tuple(int(c) for c in pixels[(pixels != rgb).any(1)][0])))
    return paths, colours


def hidden_panels(grid: Grid) -> list[int]:
    return [2, 3] if (grid.rows, grid.cols) == (2, 2) else [grid.num_panels - 1]


def summarise(rows: dict[str, list], colours, grid: Grid, toy: Toy = Toy()) -> dict[str, dict]:
    """`colours`: (object colour, background colour) per composite, as write_set returns them."""
    hidden = hidden_panels(grid)
    table = {}
    for name, images in rows.items():
        errors = np.array([colour_error(im, grid, hidden, c, bg) for im, (c, bg) in zip(images, colours)]).ravel()
        table[name] = {"colour_error": float(errors.mean()), "close": float((errors < CLOSE).mean())}
    blind = np.array([[np.abs(np.array(c) - np.array(toy.mean_colour)).mean()] * len(hidden) for c, _ in colours]).ravel()
    table["blind guess (mean colour)"] = {"colour_error": float(blind.mean()), "close": float((blind < CLOSE).mean())}
    return table


def text_to_set(model_dir: Path, lora: str, args, grid: Grid, n: int) -> list[np.ndarray]:
    """`n` sets generated from the caption alone by the real inference code (seeds seed ...)."""
    from iclora.inference.config import InferConfig
    from iclora.inference.inpaint import check_inputs, generate, load_pipeline

    plan = check_inputs(InferConfig(
        lora_path=lora, prompt=caption(grid), panels_to_inpaint=["all"], grid=str(grid), backend=args.backend,
        base_model=str(model_dir), conditioning=args.conditioning, context_timestep=args.context_timestep,
        num_inference_steps=args.inference_steps, guidance_scale=args.guidance_scale, seed=args.seed, num_images=n,
        width=args.toy.panel_size * grid.cols, height=args.toy.panel_size * grid.rows,
        native_size=True,  # at the training size, the untrained base ("none", no record) too
    ))
    backend, pipe = load_pipeline(plan)
    return [np.asarray(image) for image in generate(plan, backend, pipe)[0]]


def summarise_sets(sets: dict[str, list[np.ndarray]], grid: Grid, toy: Toy = Toy()) -> dict[str, dict]:
    table = {}
    background = None if toy.background == "per_composite" else BACKGROUND  # None: read off each image
    for name, images in sets.items():
        spread, present = np.array([set_spread(image, grid, background) for image in images]).T
        table[name] = {"spread": float(spread.mean()), "objects": float(present.mean())}
    return table


def format_sets(table: dict[str, dict]) -> str:
    lines = ["| text -> set | colour spread across panels | panels with an object |", "|---|---:|---:|"]
    lines += [f"| {name} | {r['spread']:.1f} | {r['objects']:.0%} |" for name, r in table.items()]
    return "\n".join(lines)


def format_table(table: dict[str, dict]) -> str:
    lines = ["| | hidden-panel colour error | within 25 |", "|---|---:|---:|"]
    lines += [f"| {name} | {r['colour_error']:.1f} | {r['close']:.0%} |" for name, r in table.items()]
    return "\n".join(lines)


def mask_tile(shape, grid: Grid) -> np.ndarray:
    mask = np.zeros(shape, dtype=np.uint8)
    for k in hidden_panels(grid):
        left, top, right, bottom = panel_box(k, grid, shape[1], shape[0])
        mask[top:bottom, left:right] = 255
    return mask


def read_train_log(run_dir: Path, windows: int = 10) -> list[dict]:
    """The run's train_log.jsonl as `windows` equal step windows: the mean loss and the
    masked and visible panels' MSE in each (how completion learns beside denoising)."""
    records = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    size = max(1, -(-len(records) // windows))
    out = []
    for i in range(0, len(records), size):
        chunk = records[i:i + size]
        row = {"steps": f"{chunk[0]['step']}-{chunk[-1]['step']}"}
        for key in ("loss", "masked_loss", "visible_loss"):
            values = [r[key] for r in chunk if key in r]
            if values:
                row[key] = round(float(np.mean(values)), 4)
        out.append(row)
    return out


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=["sdxl", "flux", "flux2"], default="sdxl")
    parser.add_argument("--conditioning", choices=["concat", "blend", "context", "reference"], default="concat",
                        help="reference: FLUX.2 only (the visible panels as reference tokens)")
    parser.add_argument("--context_timestep", choices=["zero", "shared"], default=None)
    parser.add_argument("--grid", default="2x2", help="2x2 or 1x3 (the layouts the bases were fitted on)")
    parser.add_argument("--n_train", type=int, default=512, help="training composites")
    parser.add_argument("--n_eval", type=int, default=24, help="evaluation composites (new colours)")
    parser.add_argument("--n_sets", type=int, default=16, help="sets generated from the caption alone per model "
                        "(0: no text -> set table)")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--lr_scheduler", default="cosine")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--inference_steps", type=int, default=20)
    parser.add_argument("--guidance_scale", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--train_args", default="", help="more training flags for (b) and (c), e.g. "
                        "'--timestep_sampling logit_normal --logit_mean 1'")
    parser.add_argument("--skip_c", action="store_true", help="do not train (c)")
    parser.add_argument("--skip_b", action="store_true", help="do not train (b): with --skip_c in another "
                        "process, (b) and (c) train in parallel")
    parser.add_argument("--skip_free", action="store_true",
                        help="concat: no row for (b) with the visible latents left to the model")
    parser.add_argument("--max_masked_panels", type=int, default=2,
                        help="for (b) (default 2, the SDXL script's; the FLUX script's own default is 3)")
    parser.add_argument("--mask_probability", type=float, default=0.7, help="for (b) (default: the trainer's)")
    parser.add_argument("--vae", default=str(TOY_VAE))
    parser.add_argument("--base", default=None, help="fitted base denoiser folder (default: fit_hard_toy.py's)")
    parser.add_argument("--work_dir", default=None)
    parser.add_argument("--picture", default=None)
    parser.add_argument("--json", default=None)
    toy_arguments(parser)
    args = parser.parse_args(argv)
    args.toy = toy_from_args(parser, args)
    args.base = args.base or str(HARD_BASES[args.backend])
    if args.backend == "flux" and args.conditioning == "concat":
        parser.error("--conditioning concat on FLUX needs a Fill-layout hard-toy base, which is not fitted")
    if args.backend == "flux2" and args.conditioning == "concat":
        parser.error("--conditioning concat: FLUX.2 has no Fill layout (use context or blend)")
    if args.conditioning == "reference" and args.backend != "flux2":
        parser.error("--conditioning reference is FLUX.2's (reference tokens)")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    grid = Grid.parse(args.grid)
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    torch.set_num_threads(args.threads or max(1, os.cpu_count() or 1))
    start, timings = time.monotonic(), {}
    toy = args.toy
    image_size = toy.panel_size * max(grid.rows, grid.cols)
    prompt, hidden = caption(grid), hidden_panels(grid)
    with tempfile.TemporaryDirectory(prefix="known_answer_hard_") as tmp:
        work = Path(args.work_dir or tmp)
        if args.backend == "flux":
            model_dir = make_flux_base_model(work / "base", "blend", Path(args.vae), Path(args.base))
        elif args.backend == "flux2":
            model_dir = make_flux2_base_model(work / "base", Path(args.vae), Path(args.base))
        else:
            model_dir = make_base_model(work / "base", Path(args.vae), Path(args.base))
        write_set(work / "train", args.n_train, grid, args.seed, toy)
        eval_paths, colours = write_set(work / "eval", args.n_eval, grid, args.seed + 1000, toy)
        truths = [np.asarray(Image.open(p).convert("RGB")) for p in eval_paths]

        def run(mask_probability, name):
            lora, timings[f"train {name}"] = train(model_dir, work / "train", work / f"lora_{name}",
                                                   mask_probability, args, grid=grid, image_size=image_size)
            return lora

        lora_b = None if args.skip_b else run(args.mask_probability, "b")
        lora_c = None if args.skip_c else run(0.0, "c")
        t = time.monotonic()
        done = lambda lora, conditioning=None: complete(  # noqa: E731
            model_dir, lora, eval_paths, args, conditioning=conditioning, prompt=prompt, hidden=hidden, grid=grid)
        b_name = f"(b) IC-LoRA, --mask_probability {args.mask_probability:g}"
        if args.max_masked_panels != 2:
            b_name += f" --max_masked_panels {args.max_masked_panels}"
        if args.train_args:
            b_name += f" {args.train_args}"
        rows = {"(a) untrained base": done("none"), **({b_name: done(str(lora_b))} if lora_b else {})}
        if lora_c:
            rows["(c) LoRA, --mask_probability 0"] = done(str(lora_c))
        if args.conditioning == "context" and lora_b:
            rows["(b) through blend inference"] = done(str(lora_b), "blend")
        if args.conditioning == "concat" and lora_b and not args.skip_free:  # what diffusers' 9-channel pipeline does alone
            rows["(b), visible latents left to the model (--no_blend_visible)"] = complete(
                model_dir, str(lora_b), eval_paths, args, prompt=prompt, hidden=hidden, grid=grid, blend_visible=False)
        timings["inference"] = time.monotonic() - t
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(args.vae).eval()
        rows["VAE round trip of the truth (floor)"] = [vae_round_trip(vae, x) for x in truths]
        table = summarise(rows, colours, grid, toy)
        t, set_table = time.monotonic(), {}
        if args.n_sets:
            sets = {"(a) untrained base": text_to_set(model_dir, "none", args, grid, args.n_sets)}
            if lora_b:
                sets[b_name] = text_to_set(model_dir, str(lora_b), args, grid, args.n_sets)
            if lora_c:
                sets["(c) LoRA, --mask_probability 0"] = text_to_set(model_dir, str(lora_c), args, grid, args.n_sets)
            sets["VAE round trip of toy sets (floor)"] = [
                vae_round_trip(vae, np.asarray(Image.open(p).convert("RGB")))
                for p in sorted((work / "train").glob("*.png"))[:args.n_sets]]
            set_table = summarise_sets(sets, grid, toy)
            timings["text -> set"] = time.monotonic() - t
        train_logs = {name: read_train_log(work / f"lora_{name}") for name in ("b", "c") if (work / f"lora_{name}").is_dir()}
        if args.picture:
            shown = range(min(4, len(truths)))
            names = [n for n in rows if n.startswith(("(b) IC", "(c)"))]
            tiles = [(truths[i], mask_tile(truths[i].shape, grid), *[rows[n][i] for n in names]) for i in shown]
            picture(Path(args.picture), tiles, ["composite", "mask", *[n.split(",")[0] for n in names]])
    timings["total"] = time.monotonic() - start
    text = format_table(table) + ("\n\n" + format_sets(set_table) if set_table else "")
    return publish(table, text, args, timings, text_to_set=set_table, train_logs=train_logs)


if __name__ == "__main__":
    main()
