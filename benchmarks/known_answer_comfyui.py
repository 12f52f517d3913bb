"""The harder known-answer toy (known_answer_hard.py) completed through ComfyUI: the same
trained context LoRA, the same evaluation composites, once through iclora's inference and
once through ComfyUI's KSampler with the IC-LoRA Context node (comfyui_iclora/), scored the
same way. Needs a ComfyUI checkout and its requirements beside ours:

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/known_answer_comfyui.py --backend flux \
        --conditioning context --context_timestep zero --steps 1650 --batch_size 4 \
        --mask_probability 1.0 --max_masked_panels 3 --work_dir runs/kah_flux

Takes known_answer_hard.py's flags; with --work_dir an already trained (b) LoRA there
(lora_b/final_model) is reused instead of trained again. ComfyUI gets the toy transformer
through comfyui_complete.py (its FLUX class, at the toy's sizes) and the prompt encoded by
the toy pipeline's text encoders (text encoding is not what is compared).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from iclora.logs import setup_logging  # noqa: E402

setup_logging()  # the stack's known noise filtered as in the CLIs, before the imports that print it

from fit_toy_flux import make_flux_base_model  # noqa: E402
from hard_toy import PANEL_SIZE, caption  # noqa: E402
from known_answer import complete, publish, train  # noqa: E402
from known_answer_hard import format_table, hidden_panels, parse_args, summarise, write_set  # noqa: E402

from iclora.panels import Grid  # noqa: E402


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.backend != "flux" or args.conditioning != "context":
        raise SystemExit("error: --backend flux --conditioning context is the case measured through ComfyUI")
    if not os.environ.get("COMFYUI_PATH"):
        raise SystemExit("error: COMFYUI_PATH must name a ComfyUI checkout")
    grid = Grid.parse(args.grid)
    torch.set_num_threads(args.threads or max(1, os.cpu_count() or 1))
    start, timings = time.monotonic(), {}
    image_size = PANEL_SIZE * max(grid.rows, grid.cols)
    prompt, hidden = caption(grid), hidden_panels(grid)
    with tempfile.TemporaryDirectory(prefix="known_answer_comfyui_") as tmp:
        work = Path(args.work_dir or tmp)
        model_dir = make_flux_base_model(work / "base", "blend", Path(args.vae), Path(args.base))
        write_set(work / "train", args.n_train, grid, args.seed)
        eval_paths, colours = write_set(work / "eval", args.n_eval, grid, args.seed + 1000)
        lora = work / "lora_b" / "final_model"
        if not (lora / "iclora_config.json").is_file():
            lora, timings["train (b)"] = train(model_dir, work / "train", work / "lora_b", args.mask_probability, args,
                                               grid=grid, image_size=image_size)
        t = time.monotonic()
        rows = {"(b) through iclora's inference": complete(model_dir, str(lora), eval_paths, args, prompt=prompt,
                                                           hidden=hidden, grid=grid)}
        timings["iclora inference"] = time.monotonic() - t
        t = time.monotonic()
        from comfyui_complete import complete_in_comfyui

        rows["(b) through the ComfyUI node"] = complete_in_comfyui(model_dir, lora, eval_paths, args, prompt, hidden, grid)
        timings["ComfyUI"] = time.monotonic() - t
        table = summarise(rows, colours, grid)
        same = [float(np.abs(a.astype(np.int16) - b.astype(np.int16)).max()) for a, b in zip(*rows.values())]
    timings["total"] = time.monotonic() - start
    text = format_table(table) + f"\n\nlargest pixel difference between the two: {max(same):.0f} of 255"
    return publish(table, text, args, timings, max_pixel_difference=max(same))


if __name__ == "__main__":
    main()
