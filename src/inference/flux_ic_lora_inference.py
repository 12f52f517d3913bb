"""Inpaint panels of a composite with a FLUX.1 In-Context LoRA.

    python src/inference/flux_ic_lora_inference.py --lora_path ./output/flux_lora/final_model \
        --input_image examples/input.png --prompt "A medieval knight character design" \
        --panels_to_inpaint 1 3 --use_gradient_mask --gradient_width 30 --strength 0.8 \
        --num_images 3 --save_comparison --seed 42
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run by path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from _bootstrap import ensure_package

    sys.path.pop(0)
    ensure_package()

from iclora.cli import infer_entry, run_cli
from iclora.backends.registry import backend_spec

# The backend's own defaults (model, rank, steps, guidance ...): backends/flux_spec.py.
DEFAULTS = backend_spec("flux").infer_defaults


def main(argv=None, prog="flux_ic_lora_inference.py"):
    return infer_entry(argv, prog, __doc__, DEFAULTS)


if __name__ == "__main__":
    run_cli(main)
