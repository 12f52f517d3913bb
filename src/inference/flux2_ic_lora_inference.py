"""Inpaint panels of a composite with a FLUX.2 [klein] In-Context LoRA.

    python src/inference/flux2_ic_lora_inference.py --lora_path ./output/flux2_lora/final_model \
        --input_image examples/input.png --prompt "A medieval knight character design" \
        --panels_to_inpaint 1 3 --num_images 3 --save_comparison --seed 42

A LoRA trained on a base model also runs on the step-distilled [klein] models
(--base_model black-forest-labs/FLUX.2-klein-4B): when the base model's pipeline config says
it is distilled, the defaults become its 4 steps without guidance (flags still override).
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run by path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from _bootstrap import ensure_package

    sys.path.pop(0)
    ensure_package()

from iclora.cli import infer_entry, run_cli
from iclora.backends.flux2_spec import DISTILLED_DEFAULTS, base_model_of, is_distilled
from iclora.backends.registry import backend_spec

# The backend's own defaults (steps, guidance): backends/flux2_spec.py.
DEFAULTS = backend_spec("flux2").infer_defaults


def main(argv=None, prog="flux2_ic_lora_inference.py"):
    argv = list(sys.argv[1:] if argv is None else argv)
    distilled = DISTILLED_DEFAULTS if is_distilled(base_model_of(argv)) else {}
    return infer_entry(argv, prog, __doc__, {**DEFAULTS, **distilled})


if __name__ == "__main__":
    run_cli(main)
